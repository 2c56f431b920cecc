"""A small CRI (runtime.v1) client for tests, in place of crictl: gRPC to containerd's CRI plugin.

Every call raises grpc.RpcError on failure (its `.code()` and `.details()` carry containerd's answer).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from protos.k8s.cri.v1 import api_pb2 as cri
from protos.k8s.cri.v1 import api_pb2_grpc as cri_grpc

from .containerd import PrivateContainerd
from .containerd_releases import HOST, Release


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


def pod_config(name: str, *, uid: str = "", namespace: str = "default", host_network: bool = False, host_ipc: bool = False,
               annotations: Mapping[str, str] | None = None, hostname: str = "",
               log_directory: str = "") -> cri.PodSandboxConfig:
    """A PodSandboxConfig: the pod's own network namespace (PrivateContainerd's default CNI bridge)
    unless host_network (NamespaceOption network=NODE: kata-py refuses it, runc takes it)."""
    ns = cri.NamespaceOption(network=cri.NODE if host_network else cri.POD, pid=cri.CONTAINER, ipc=cri.NODE if host_ipc else cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid or f"uid-{name}", namespace=namespace, attempt=0),
        hostname=hostname or name, log_directory=log_directory, annotations=dict(annotations or {}),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns)))


def container_config(name: str, image: str, command: Sequence[str], *, args: Sequence[str] = (),
                     env: Mapping[str, str] | None = None, log_path: str = "",
                     cpu_quota: int = 0, cpu_period: int = 0, memory_limit: int = 0,
                     mounts: Mapping[str, str] | None = None, host_pid: bool = False,
                     propagation: int = 0) -> cri.ContainerConfig:
    """mounts: container path -> host path (read-write), as kubelet passes a pod's volumes, with
    `propagation` (cri.PROPAGATION_*) for each;
    host_pid: the container shares the pid namespace of its host (the VM, for kata-py)."""
    resources = cri.LinuxContainerResources(cpu_quota=cpu_quota, cpu_period=cpu_period,
                                            memory_limit_in_bytes=memory_limit)
    security = cri.LinuxContainerSecurityContext(namespace_options=cri.NamespaceOption(pid=cri.NODE)) \
        if host_pid else None
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image), command=list(command),
        args=list(args), envs=[cri.KeyValue(key=k, value=v.encode()) for k, v in (env or {}).items()],
        mounts=[cri.Mount(container_path=c, host_path=h, propagation=propagation) for c, h in (mounts or {}).items()],
        log_path=log_path, linux=cri.LinuxContainerConfig(resources=resources, security_context=security))


class CriClient:
    """RuntimeService and ImageService over one channel; use as a context manager or call close()."""

    def __init__(self, target: str, timeout: float = 240) -> None:
        self.channel = grpc.insecure_channel(target)
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def version(self) -> cri.VersionResponse:
        return self.runtime.Version(cri.VersionRequest(version="v1"), timeout=self.timeout)

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, runtime_handler: str) -> str:
        req = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self.runtime.RunPodSandbox(req, timeout=self.timeout).pod_sandbox_id

    def stop_pod_sandbox(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def remove_pod_sandbox(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def create_container(self, pod_id: str, config: cri.ContainerConfig,
                         sandbox_config: cri.PodSandboxConfig) -> str:
        req = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config)
        return self.runtime.CreateContainer(req, timeout=self.timeout).container_id

    def start_container(self, cid: str) -> None:
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=self.timeout)

    def stop_container(self, cid: str, timeout_s: int = 10) -> None:
        self.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=timeout_s),
                                   timeout=self.timeout)

    def remove_container(self, cid: str) -> None:
        self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=self.timeout)

    def container_status(self, cid: str) -> cri.ContainerStatus:
        req = cri.ContainerStatusRequest(container_id=cid)
        return self.runtime.ContainerStatus(req, timeout=self.timeout).status

    def list_pod_sandboxes(self) -> list[cri.PodSandbox]:
        return list(self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=self.timeout).items)

    def list_containers(self, pod_id: str = "") -> list[cri.Container]:
        req = cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.runtime.ListContainers(req, timeout=self.timeout).containers)

    def update_container_resources(self, cid: str, *, cpu_quota: int = 0, cpu_period: int = 0,
                                   memory_limit: int = 0) -> None:
        linux = cri.LinuxContainerResources(cpu_quota=cpu_quota, cpu_period=cpu_period,
                                            memory_limit_in_bytes=memory_limit)
        req = cri.UpdateContainerResourcesRequest(container_id=cid, linux=linux)
        self.runtime.UpdateContainerResources(req, timeout=self.timeout)

    def exec_sync(self, cid: str, cmd: Sequence[str], timeout_s: int = 60) -> ExecResult:
        req = cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout_s)
        resp = self.runtime.ExecSync(req, timeout=max(self.timeout, timeout_s + 30))
        return ExecResult(resp.stdout, resp.stderr, resp.exit_code)

    def list_images(self) -> list[cri.Image]:
        return list(self.images.ListImages(cri.ListImagesRequest(), timeout=self.timeout).images)

    def image_status(self, image: str) -> cri.Image | None:
        resp = self.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image)),
                                       timeout=self.timeout)
        return resp.image if resp.HasField("image") else None


@contextmanager
def private_cri(kata_config: str = "", release: Release = HOST) -> Iterator[tuple[PrivateContainerd, CriClient, str]]:
    """A private containerd with the CRI plugin (kata-py's handler, the default CNI bridge), its CRI
    images imported, and a client: (containerd, client, busybox image). Cleaned up on exit."""
    ctd = PrivateContainerd(kata_config=kata_config, cri=True, release=release).start()
    try:
        busybox, _pause = ctd.import_cri_images()
        with CriClient(ctd.cri_address) as client:
            yield ctd, client, busybox
    finally:
        ctd.cleanup()
