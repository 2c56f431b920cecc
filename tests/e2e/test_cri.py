"""containerd's CRI plugin drives kata-py (issue #7): a pod is one VM; annotations are default-deny.

Our own CRI client (tests/support/cri.py) against a private containerd with the CRI plugin on, runtime
handler `kata-py`, each pod in its own network namespace on PrivateContainerd's default CNI bridge
(host-network pods are refused: a VM cannot share the host's network).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from protos.k8s.cri.v1 import api_pb2 as cri
from shim.config import Config
from tests.support import owned
from tests.support.containerd import EVERY_RELEASE, RUNTIME_HANDLER, PrivateContainerd
from tests.support.containerd_releases import Release
from tests.support.cri import CriClient, container_config, pod_config, private_cri
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.vm]

H = "io.katacontainers.config.hypervisor."


@EVERY_RELEASE
def test_pod_of_two_containers_in_one_vm(cri_env: tuple[PrivateContainerd, CriClient, str]):
    ctd, client, busybox = cri_env
    logs = ctd.dir / "pods"
    logs.mkdir()
    pod = pod_config("web", log_directory=str(logs))
    pod_id = client.run_pod_sandbox(pod, RUNTIME_HANDLER)
    try:
        assert len(qemu_pids(ctd)) == 1, ctd.log_tail()
        loop = ["sh", "-c", "echo started; while :; do sleep 1; done"]
        server = ["sh", "-c", "echo pong-from-one > /tmp/pong; nc -ll -p 8080 -e cat /tmp/pong & "
                  "echo started; while :; do sleep 1; done"]
        c1 = client.create_container(pod_id, container_config("one", busybox, server, log_path="one.log"), pod)
        c2 = client.create_container(pod_id, container_config("two", busybox, loop, log_path="two.log"), pod)
        client.start_container(c1)
        client.start_container(c2)
        for cid in (c1, c2):
            assert client.container_status(cid).state == 1, client.container_status(cid)  # CONTAINER_RUNNING
        assert {c.id for c in client.list_containers(pod_id)} == {c1, c2}

        # both containers run on the pod VM's kernel: one boot id, not the host's, and still one QEMU
        boot_ids = []
        for cid in (c1, c2):
            res = client.exec_sync(cid, ["sh", "-c", "echo hello-$(hostname); cat /proc/sys/kernel/random/boot_id"])
            assert res.exit_code == 0, res
            lines = res.stdout.decode().split()
            assert lines[0].startswith("hello-"), res
            boot_ids.append(lines[1])
        assert boot_ids[0] == boot_ids[1]
        assert boot_ids[0] != Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert len(qemu_pids(ctd)) == 1

        # the pod's containers share the VM's network: the second reaches the first over localhost
        reply = wait_for(lambda: (lambda r: r if b"pong-from-one" in r.stdout else None)(
            client.exec_sync(c2, ["nc", "-w", "3", "127.0.0.1", "8080"])), 30, "nc from two to one")
        assert reply.stdout.strip() == b"pong-from-one"

        failing = client.exec_sync(c2, ["sh", "-c", "echo oops >&2; exit 3"])
        assert (failing.exit_code, failing.stderr) == (3, b"oops\n")

        # the Update RPC reaches the shim (and its VM sizing) without error
        client.update_container_resources(c1, cpu_quota=150000, cpu_period=100000, memory_limit=256 << 20)
        status = client.container_status(c1)
        assert status.state == 1

        client.stop_container(c2, timeout_s=5)
        assert client.container_status(c2).state == 2  # CONTAINER_EXITED
        client.remove_container(c2)
        assert [c.id for c in client.list_containers(pod_id)] == [c1]
    finally:
        client.stop_pod_sandbox(pod_id)
        client.remove_pod_sandbox(pod_id)
    assert client.list_containers(pod_id) == []
    wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")
    wait_for(lambda: not ctd.stray_processes(), 30, "shim gone after RemovePodSandbox")


def test_empty_dirs_are_backed_in_the_guest(cri_env: tuple[PrivateContainerd, CriClient, str], tmp_path: Path):
    """kubelet's emptyDirs (a host tmpfs for medium Memory, a plain directory otherwise) become one
    guest tmpfs / guest directory per pod, shared by the containers mounting them; the host directories
    stay empty, and a guest volume goes with the last container using it."""
    ctd, client, busybox = cri_env
    uid = "uid-volumes"
    empty_dirs = tmp_path / "pods" / uid / "volumes" / "kubernetes.io~empty-dir"
    cache, scratch = empty_dirs / "cache", empty_dirs / "scratch"
    cache.mkdir(parents=True)
    scratch.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(cache)], check=True)
    try:
        pod = pod_config("volumes", uid=uid)
        pod_id = client.run_pod_sandbox(pod, RUNTIME_HANDLER)
        try:
            loop = ["sh", "-c", "while :; do sleep 1; done"]
            volumes = {"/cache": str(cache), "/scratch": str(scratch)}
            writer, reader = (client.create_container(pod_id, container_config(name, busybox, loop, mounts=volumes), pod)
                              for name in ("writer", "reader"))
            for cid in (writer, reader):
                client.start_container(cid)

            res = client.exec_sync(writer, ["sh", "-c", "echo from-writer > /cache/f && echo on-disk > /scratch/g"])
            assert res.exit_code == 0, res
            res = client.exec_sync(reader, ["sh", "-c", "cat /cache/f /scratch/g; grep -E ' /(cache|scratch) ' /proc/mounts"])
            assert res.exit_code == 0, res
            lines = res.stdout.decode().splitlines()
            assert lines[:2] == ["from-writer", "on-disk"], res
            [cache_line] = [line for line in lines if " /cache " in line]
            assert cache_line.split()[2] == "tmpfs" and "size=16384k" in cache_line, cache_line
            assert not any(" 9p " in line for line in lines), lines  # neither comes from the host
            assert os.listdir(cache) == [] and os.listdir(scratch) == []

            # the pod's volumes, not the writer's: they outlive the writer while the reader uses them
            client.stop_container(writer, timeout_s=5)
            client.remove_container(writer)
            res = client.exec_sync(reader, ["cat", "/cache/f", "/scratch/g"])
            assert res.stdout == b"from-writer\non-disk\n", res
            # the last user removed, they go: a later container of the pod gets them anew, empty
            client.stop_container(reader, timeout_s=5)
            client.remove_container(reader)
            later = client.create_container(pod_id, container_config("later", busybox, loop, mounts=volumes), pod)
            client.start_container(later)
            res = client.exec_sync(later, ["ls", "-A", "/cache", "/scratch"])
            assert res.exit_code == 0 and res.stdout == b"/cache:\n\n/scratch:\n", res
        finally:
            client.stop_pod_sandbox(pod_id)
            client.remove_pod_sandbox(pod_id)
        wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")
        wait_for(lambda: not ctd.stray_processes(), 30, "shim gone after RemovePodSandbox")
        assert not list(ctd.kata_state.glob("sandboxes/*")), "sandbox state left behind"
        assert os.listdir(cache) == [] and os.listdir(scratch) == []
    finally:
        subprocess.run(["umount", str(cache)], check=False)


def test_pods_asking_for_host_namespaces_are_refused_and_leave_nothing(
        cri_env: tuple[PrivateContainerd, CriClient, str]):
    """hostNetwork / hostIPC cannot be given by a VM: RunPodSandbox fails early, naming the field and
    the way out (a runc RuntimeClass), and no pod, container, shim or QEMU remains."""
    ctd, client, _busybox = cri_env
    for name, kwargs, field in (("hostnet", {"host_network": True}, "hostNetwork: true"),
                                ("hostipc", {"host_ipc": True}, "hostIPC: true")):
        with pytest.raises(grpc.RpcError) as info:
            client.run_pod_sandbox(pod_config(name, **kwargs), RUNTIME_HANDLER)
        assert field in info.value.details() and "runc RuntimeClass" in info.value.details(), info.value.details()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert client.list_pod_sandboxes() == []
    assert client.list_containers() == []
    assert not qemu_pids(ctd)
    wait_for(lambda: not ctd.stray_processes(), 30, "no shim left after refused pods")


def test_an_oom_kill_shows_as_oomkilled(cri_env: tuple[PrivateContainerd, CriClient, str]):
    """The guest's OOM kill reaches containerd as TaskOOM, so CRI (and kubelet) report OOMKilled."""
    ctd, client, busybox = cri_env
    pod = pod_config("oom")
    pod_id = client.run_pod_sandbox(pod, RUNTIME_HANDLER)
    try:
        # a shell string that doubles without end: the 48 MiB limit kills it
        hog = container_config("hog", busybox, ["sh", "-c", "x=0123456789; while :; do x=$x$x; done"],
                               memory_limit=48 << 20)
        cid = client.create_container(pod_id, hog, pod)
        client.start_container(cid)
        status = wait_for(lambda: (lambda s: s if s.state == 2 else None)(client.container_status(cid)),
                          120, "the hog exited")  # CONTAINER_EXITED
        assert (status.reason, status.exit_code) == ("OOMKilled", 137), status
    finally:
        client.stop_pod_sandbox(pod_id)
        client.remove_pod_sandbox(pod_id)
    wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")


def test_a_container_sees_its_own_cgroup_and_its_updates(cri_env: tuple[PrivateContainerd, CriClient, str]):
    """As runc gives them on a cgroup v2 host: a cgroup namespace, and /sys/fs/cgroup showing the
    container's own limits (JVMs, Go and .NET size themselves from memory.max and cpu.max), also
    after UpdateContainerResources."""
    ctd, client, busybox = cri_env
    pod = pod_config("cgroups")
    pod_id = client.run_pod_sandbox(pod, RUNTIME_HANDLER)
    try:
        config = container_config("app", busybox, ["sh", "-c", "while :; do sleep 1; done"],
                                  cpu_quota=50_000, cpu_period=100_000, memory_limit=128 << 20)
        cid = client.create_container(pod_id, config, pod)
        client.start_container(cid)
        probe = ["sh", "-c", "cat /proc/self/cgroup /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max"]
        res = client.exec_sync(cid, probe)
        assert res.exit_code == 0, res
        assert res.stdout.decode().splitlines() == ["0::/", str(128 << 20), "50000 100000"], res
        client.update_container_resources(cid, cpu_quota=150_000, cpu_period=100_000, memory_limit=256 << 20)
        res = client.exec_sync(cid, probe)
        assert res.stdout.decode().splitlines() == ["0::/", str(256 << 20), "150000 100000"], res
    finally:
        client.stop_pod_sandbox(pod_id)
        client.remove_pod_sandbox(pod_id)
    wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")


def test_host_mounts_propagate_into_host_to_container_volumes(cri_env: tuple[PrivateContainerd, CriClient, str],
                                                             tmp_path: Path):
    """kubelet's HostToContainer (rslave) and Bidirectional (rshared): a mount the host makes below the
    volume after the container started shows in the container (through the share, a slave of the
    host's mount). The other way cannot cross the share: a container's own mount stays in the VM."""
    ctd, client, busybox = cri_env
    vol = tmp_path / "vol"
    (vol / "later").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(vol), str(vol)], check=True)
    subprocess.run(["mount", "--make-rshared", str(vol)], check=True)
    pod = pod_config("propagation")
    pod_id = client.run_pod_sandbox(pod, RUNTIME_HANDLER)
    try:
        loop = ["sh", "-c", "while :; do sleep 1; done"]
        cids = {}
        for name, mode in (("slave", cri.PROPAGATION_HOST_TO_CONTAINER), ("shared", cri.PROPAGATION_BIDIRECTIONAL),
                           ("private", cri.PROPAGATION_PRIVATE)):
            cids[name] = client.create_container(
                pod_id, container_config(name, busybox, loop, mounts={"/vol": str(vol)}, propagation=mode), pod)
            client.start_container(cids[name])
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(vol / "later")], check=True)
        (vol / "later" / "flag").write_text("mounted on the host")
        for name, expected in (("slave", b"flag\n"), ("shared", b"flag\n"), ("private", b"")):
            res = client.exec_sync(cids[name], ["ls", "-A", "/vol/later"])
            assert (res.exit_code, res.stdout) == (0, expected), (name, res)
    finally:
        client.stop_pod_sandbox(pod_id)
        client.remove_pod_sandbox(pod_id)
        subprocess.run(["umount", "-l", str(vol)], check=False)
    wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")


def test_refused_annotations_fail_run_pod_sandbox(tmp_path: Path):
    guest = Config().guest_dir().resolve()
    config = (f'[hypervisor]\nvalid_asset_dirs = ["{guest}"]\n'
              "[runtime]\nenable_annotations = ['config\\.hypervisor\\.(kernel|kernel_hash)']\n")
    with private_cri(config) as (ctd, client, _busybox):
        cases = [
            ({H + "default_vcpus": "2"}, "default_vcpus is not enabled"),
            ({H + "kernel": str(guest / "vmlinux"), H + "kernel_hash": "ab" * 64}, "does not match"),
            ({H + "kernel": "/etc/passwd", H + "kernel_hash": "ab" * 64}, "not under a valid asset directory"),
        ]
        for i, (ann, expected) in enumerate(cases):
            with pytest.raises(grpc.RpcError) as info:
                client.run_pod_sandbox(pod_config(f"bad{i}", annotations=ann), RUNTIME_HANDLER)
            assert expected in info.value.details(), info.value.details()
        assert not qemu_pids(ctd)
        wait_for(lambda ctd=ctd: not ctd.stray_processes(), 30, "no shim left after refused pods")


@EVERY_RELEASE
def test_two_cni_pods_on_one_bridge_reach_each_other(tmp_path: Path, containerd_release: Release):
    """Pods whose netns CNI made (bridge + host-local, Debian's plugins): the shim mirrors each netns
    into its VM, and one pod's container reaches the other's over the bridge."""
    bridge = owned.test_name("kpcni")
    ctd = PrivateContainerd(cri=True, release=containerd_release)
    ctd.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    (ctd.cni_conf_dir / "10-kp.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "kp-test", "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.7.0/24"}]],
                     "dataDir": str(tmp_path / "ipam")}}]}))
    pods: list[str] = []
    try:
        ctd.start()
        busybox, _pause = ctd.import_cri_images()
        with CriClient(ctd.cri_address) as client:
            server = ["sh", "-c", "echo pong-over-the-bridge > /tmp/pong; nc -ll -p 8080 -e cat /tmp/pong & "
                      "while :; do sleep 1; done"]
            loop = ["sh", "-c", "while :; do sleep 1; done"]
            cids = []
            for name, command in (("srv", server), ("cli", loop)):
                pod = pod_config(name, host_network=False)
                pods.append(client.run_pod_sandbox(pod, RUNTIME_HANDLER))
                cid = client.create_container(pods[-1], container_config(name, busybox, command), pod)
                client.start_container(cid)
                cids.append(cid)
            assert len(qemu_pids(ctd)) == 2
            addr = client.exec_sync(cids[0], ["ip", "-4", "-o", "addr", "show"]).stdout.decode()
            ip = next(w.split("/")[0] for w in addr.split() if w.startswith("10.99.7."))
            reply = wait_for(lambda: (lambda r: r if b"pong" in r.stdout else None)(
                client.exec_sync(cids[1], ["nc", "-w", "3", ip, "8080"])), 60, f"nc from cli to srv at {ip}")
            assert reply.stdout.strip() == b"pong-over-the-bridge"
            for pod_id in pods:
                client.stop_pod_sandbox(pod_id)
                client.remove_pod_sandbox(pod_id)
            pods.clear()
        wait_for(lambda: not qemu_pids(ctd), 30, "QEMUs gone")
    finally:
        ctd.cleanup()
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
