"""gRPC adapter: each Agent RPC converts the request to our types, delegates, and maps errors once.

Generated proto types stop here. Handlers run in the sync server's thread pool; streaming and waiting
RPCs hold a thread each, hence the generous pool.
"""

import functools
import itertools
import logging
import os
import queue
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from agent import __version__, cgroups, guest, network, portforward
from agent.containers import Containers
from agent.errors import (
    AgentError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from agent.oom import OomWatcher
from agent.paths import resolve_inside, validate_id
from agent.reaper import Reaper
from agent.sandbox import Sandbox, SandboxSpec
from agent.spec import parse_json
from agent.storage import DRIVERS, Mounted, StorageSpec, mount_storage, unmount_storage
from agent.volumes import POD_DRIVERS
from protos.agent.v1 import agent_pb2 as pb
from protos.agent.v1 import agent_pb2_grpc as pb_grpc

MAX_WORKERS = 128  # every ReadStdout/ReadStderr/WaitProcess/GetOOMEvents call holds one thread
_CODES: dict[type[AgentError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    portforward.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_EMPTY = empty_pb2.Empty()
log = logging.getLogger("agent")
F = TypeVar("F", bound=Callable[..., Any])


def _status(e: AgentError) -> grpc.StatusCode:
    for cls, code in _CODES.items():
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _unary(fn: F) -> F:
    """Map AgentError to its status code (the one place that does)."""
    @functools.wraps(fn)
    def wrapper(self: "AgentServicer", request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.monotonic()
        try:
            return fn(self, request, context)
        except AgentError as e:
            context.abort(_status(e), str(e))
        except Exception as e:  # a bug or an unexpected OSError: still a readable status
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {type(e).__name__}: {e}")
        finally:  # the guest's side of the shim's timing lines (console, debug level)
            log.debug("timing rpc=%s took=%.3f", fn.__name__, time.monotonic() - t0)
    return wrapper  # type: ignore[return-value]


def _streaming(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: "AgentServicer", request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except AgentError as e:
            context.abort(_status(e), str(e))
        except Exception as e:  # a bug or an unexpected OSError: still a readable status
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {type(e).__name__}: {e}")
    return wrapper  # type: ignore[return-value]


def _address(a: pb.IPAddress) -> network.Address:
    try:
        prefix = int(a.mask)
    except ValueError:
        raise InvalidArgument(f"IP address {a.address}: bad prefix length {a.mask!r}") from None
    return network.Address(a.address, prefix, 6 if a.family == pb.IPAddress.V6 else 4)


def _family_pb(family: int) -> pb.IPAddress.Family:
    return pb.IPAddress.V6 if family == 6 else pb.IPAddress.V4


def _link_pb(link: network.Link) -> pb.Interface:
    return pb.Interface(name=link.name, hw_addr=link.mac, mtu=link.mtu, ip_addresses=[
        pb.IPAddress(family=_family_pb(a.family), address=a.address, mask=str(a.prefix_len))
        for a in link.addresses])


def _route_pb(r: network.Route) -> pb.Route:
    return pb.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
                    family=_family_pb(r.family))


def _storage(s: pb.Storage) -> StorageSpec:
    return StorageSpec(driver=s.driver, source=s.source, fstype=s.fstype, options=list(s.options),
                       driver_options=list(s.driver_options), mount_point=s.mount_point)


def _cid(request: Any) -> str:
    return validate_id(request.container_id, "container_id")


def _eid(request: Any) -> str:
    return validate_id(request.exec_id, "exec_id") if request.exec_id else ""


def reaped_run(reaper: Reaper) -> Callable[..., subprocess.CompletedProcess[str]]:
    """A `subprocess.run(argv, input=, capture_output=True, text=True, timeout=)` look-alike over the
    reaper (what network.Ip calls)."""

    def run(argv: list[str], input: str | None = None, timeout: float = 30.0,  # noqa: A002
            **_: object) -> subprocess.CompletedProcess[str]:
        try:
            done = reaper.run(argv, input=input.encode() if input is not None else None, timeout=timeout)
        except TimeoutError as exc:
            raise subprocess.TimeoutExpired(argv, timeout) from exc
        return subprocess.CompletedProcess(argv, done.code, done.stdout.decode(errors="replace"),
                                           done.stderr.decode(errors="replace"))

    return run


class AgentServicer(pb_grpc.AgentServicer):
    """Thin adapter over Sandbox / Containers / guest functions."""

    def __init__(self, root: str, sandbox: Sandbox, containers: Containers, oom: OomWatcher,
                 reaper: Reaper) -> None:
        self.root = root
        self.sandbox = sandbox
        self.containers = containers
        self.oom = oom
        # `ip` runs through the reaper: it reaps every child (PID 1 in the guest), so a plain
        # subprocess would find its child gone and report exit 0 — an `ip` failure lost
        self.network = network.Network(network.Ip(reaped_run(reaper)))
        self.forwarder = portforward.Forwarder()

    # --- sandbox ---
    @_unary
    def CreateSandbox(self, request: pb.CreateSandboxRequest, context: Any) -> empty_pb2.Empty:
        self.sandbox.create(SandboxSpec(
            sandbox_id=request.sandbox_id, hostname=request.hostname, dns=list(request.dns),
            storages=[_storage(s) for s in request.storages],
            kernel_modules=[(m.name, list(m.parameters)) for m in request.kernel_modules],
            machine_id=request.machine_id))
        return _EMPTY

    @_unary
    def DestroySandbox(self, request: pb.DestroySandboxRequest, context: Any) -> empty_pb2.Empty:
        self.sandbox.destroy()
        return _EMPTY

    @_unary
    def GetGuestDetails(self, request: pb.GuestDetailsRequest, context: Any) -> pb.GuestDetailsResponse:
        d = guest.details()
        return pb.GuestDetailsResponse(
            mem_block_size_bytes=d.mem_block_size_bytes if request.mem_block_size else 0,
            agent_details=pb.AgentDetails(version=__version__, storage_handlers=list(DRIVERS),
                                          oci_runtime=self.containers.runtime.name),
            online_cpus=d.online_cpus, mem_total_bytes=d.mem_total_bytes, kernel_release=d.kernel_release)

    @_unary
    def SetGuestDateTime(self, request: pb.SetGuestDateTimeRequest, context: Any) -> empty_pb2.Empty:
        guest.set_time(request.sec, request.usec)
        return _EMPTY

    @_unary
    def ReseedRandomDev(self, request: pb.ReseedRandomDevRequest, context: Any) -> empty_pb2.Empty:
        guest.reseed_random(request.data)
        return _EMPTY

    # --- containers ---
    @_unary
    def CreateContainer(self, request: pb.CreateContainerRequest,
                        context: Any) -> pb.CreateContainerResponse:
        cid = _cid(request)
        spec = parse_json(request.oci_spec_json, "oci_spec_json")
        if not request.HasField("rootfs"):
            raise InvalidArgument(f"rootfs: container {cid}: no rootfs storage given")
        rootfs = _storage(request.rootfs)
        mounted: list[Mounted] = []
        volumes: list[str] = []  # pod volumes this call took a reference on
        try:
            if rootfs.driver:
                mounted.append(mount_storage(rootfs, self.root, "rootfs"))
                rootfs_path = mounted[-1].path
            else:  # already visible in the guest (e.g. inside the shared directory)
                rootfs_path = resolve_inside(self.root, rootfs.mount_point, "rootfs.mount_point")
                if not os.path.isdir(rootfs_path):
                    raise InvalidArgument(f"rootfs.mount_point: {rootfs.mount_point} is not a directory")
            for i, s in enumerate(request.storages):
                if s.driver in POD_DRIVERS:  # emptyDir: one per pod, shared, refcounted
                    path, added = self.containers.volumes.acquire(cid, _storage(s), f"storages[{i}]")
                    if added:
                        volumes.append(path)
                else:
                    mounted.append(mount_storage(_storage(s), self.root, f"storages[{i}]"))
            self.sandbox.prepare_for(spec)
            c = self.containers.create(cid, spec, rootfs_path, request.terminal, request.stdin, mounted)
        except BaseException:
            for m in reversed(mounted):
                unmount_storage(m)
            self.containers.volumes.release(cid, volumes)
            raise
        return pb.CreateContainerResponse(pid=c.init.pid)

    @_unary
    def StartContainer(self, request: pb.ContainerRequest, context: Any) -> empty_pb2.Empty:
        self.containers.start(_cid(request))
        return _EMPTY

    @_unary
    def RemoveContainer(self, request: pb.RemoveContainerRequest, context: Any) -> empty_pb2.Empty:
        self.containers.remove(_cid(request), request.timeout_seconds or None)
        return _EMPTY

    @_unary
    def UpdateContainer(self, request: pb.UpdateContainerRequest, context: Any) -> empty_pb2.Empty:
        cid = _cid(request)
        self.containers.get(cid)
        parse_json(request.linux_resources_json, "linux_resources_json")
        self.containers.runtime.update(cid, request.linux_resources_json)
        return _EMPTY

    @_unary
    def StatsContainer(self, request: pb.ContainerRequest, context: Any) -> pb.StatsContainerResponse:
        s = cgroups.read_stats(self.containers.get(_cid(request)).cgroup)
        return pb.StatsContainerResponse(
            cpu=pb.CpuUsage(total_usage_ns=s.cpu_usage_ns, usage_in_kernelmode_ns=s.cpu_system_ns,
                            usage_in_usermode_ns=s.cpu_user_ns),
            memory=pb.MemoryStats(usage=s.memory_usage, max_usage=s.memory_max_usage, limit=s.memory_limit,
                                  cache=s.memory_cache, stats=s.memory_stat),
            pids=pb.PidsStats(current=s.pids_current, limit=s.pids_limit))

    @_unary
    def PauseContainer(self, request: pb.ContainerRequest, context: Any) -> empty_pb2.Empty:
        self.containers.pause(_cid(request))
        return _EMPTY

    @_unary
    def ResumeContainer(self, request: pb.ContainerRequest, context: Any) -> empty_pb2.Empty:
        self.containers.resume(_cid(request))
        return _EMPTY

    @_unary
    def ListProcesses(self, request: pb.ContainerRequest, context: Any) -> pb.ListProcessesResponse:
        cid = _cid(request)
        self.containers.get(cid)
        return pb.ListProcessesResponse(pids=self.containers.runtime.ps(cid))

    # --- processes ---
    @_unary
    def ExecProcess(self, request: pb.ExecProcessRequest, context: Any) -> pb.ExecProcessResponse:
        cid = _cid(request)
        if not request.exec_id:
            raise InvalidArgument(f"exec_id: container {cid}: exec needs an id")
        process = parse_json(request.process_json, "process_json")
        p = self.containers.exec(cid, _eid(request), process, request.terminal, request.stdin)
        return pb.ExecProcessResponse(pid=p.pid)

    @_unary
    def SignalProcess(self, request: pb.SignalProcessRequest, context: Any) -> empty_pb2.Empty:
        if not 0 < request.signal < 65:
            raise InvalidArgument(f"signal: {request.signal} is not a signal number")
        self.containers.signal(_cid(request), _eid(request), request.signal, request.all)
        return _EMPTY

    @_unary
    def WaitProcess(self, request: pb.ProcessRequest, context: Any) -> pb.WaitProcessResponse:
        status = self.containers.wait(_cid(request), _eid(request))
        if not _eid(request):
            # an OOM-killed init exits before the next poll would see its counter: queue the OOM
            # event now, ahead of the exit (the shim then publishes TaskOOM before TaskExit)
            self.oom.poll_once()
        return pb.WaitProcessResponse(status=status)

    @_unary
    def WriteStdin(self, request: pb.WriteStdinRequest, context: Any) -> pb.WriteStdinResponse:
        p = self.containers.process(_cid(request), _eid(request))
        return pb.WriteStdinResponse(len=p.stdio.write_stdin(request.data))

    @_unary
    def CloseStdin(self, request: pb.ProcessRequest, context: Any) -> empty_pb2.Empty:
        self.containers.process(_cid(request), _eid(request)).stdio.close_stdin()
        return _EMPTY

    @_streaming
    def ReadStdout(self, request: pb.ProcessRequest, context: Any) -> Iterator[pb.OutputChunk]:
        p = self.containers.process(_cid(request), _eid(request))
        for data in p.stdio.stdout.chunks(context.is_active):
            yield pb.OutputChunk(data=data)

    @_streaming
    def ReadStderr(self, request: pb.ProcessRequest, context: Any) -> Iterator[pb.OutputChunk]:
        p = self.containers.process(_cid(request), _eid(request))
        for data in p.stdio.stderr.chunks(context.is_active):
            yield pb.OutputChunk(data=data)

    @_unary
    def TtyWinResize(self, request: pb.TtyWinResizeRequest, context: Any) -> empty_pb2.Empty:
        p = self.containers.process(_cid(request), _eid(request))
        p.stdio.resize(request.row, request.column)
        return _EMPTY

    # --- resources ---
    @_unary
    def OnlineCPUMem(self, request: pb.OnlineCPUMemRequest, context: Any) -> pb.OnlineCPUMemResponse:
        cpus, mem = guest.online_cpu_mem(request.nb_cpus if request.wait else 0, request.cpu_only)
        return pb.OnlineCPUMemResponse(online_cpus=cpus, mem_total_bytes=mem)

    # --- network (see agent/network.py) ---
    @_unary
    def UpdateInterface(self, request: pb.UpdateInterfaceRequest, context: Any) -> pb.Interface:
        i = request.interface
        link = self.network.update_interface(i.hw_addr, i.mtu, [_address(a) for a in i.ip_addresses])
        return _link_pb(link)

    @_unary
    def UpdateRoutes(self, request: pb.UpdateRoutesRequest, context: Any) -> pb.Routes:
        wanted = [network.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
                                family=6 if r.family == pb.IPAddress.V6 else 4) for r in request.routes.routes]
        return pb.Routes(routes=[_route_pb(r) for r in self.network.update_routes(wanted)])

    @_unary
    def AddARPNeighbors(self, request: pb.AddARPNeighborsRequest, context: Any) -> empty_pb2.Empty:
        self.network.add_neighbors([network.Neighbor(n.to_ip_address.address, n.device, n.lladdr)
                                    for n in request.neighbors])
        return _EMPTY

    @_unary
    def ListInterfaces(self, request: empty_pb2.Empty, context: Any) -> pb.Interfaces:
        return pb.Interfaces(interfaces=[_link_pb(link) for link in self.network.links()])

    @_unary
    def ListRoutes(self, request: empty_pb2.Empty, context: Any) -> pb.Routes:
        return pb.Routes(routes=[_route_pb(r) for r in self.network.routes()])

    # --- events ---
    @_streaming
    def GetOOMEvents(self, request: empty_pb2.Empty, context: Any) -> Iterator[pb.OOMEvent]:
        q = self.oom.subscribe()
        try:
            while context.is_active():
                try:
                    cid = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield pb.OOMEvent(container_id=cid)
        finally:
            self.oom.unsubscribe(q)

    # --- port forwarding (see agent/portforward.py) ---
    @_streaming
    def PortForward(self, requests: Iterator[pb.PortForwardFrame],
                    context: Any) -> Iterator[pb.PortForwardFrame]:
        first = next(requests, None)
        if first is None:  # the host gave up before asking
            return
        target = portforward.parse_target(first.port, first.family)
        incoming = (f.data for f in itertools.chain((first,), requests) if f.data)
        for chunk in self.forwarder.forward(target, incoming, context.add_callback):
            if chunk is None:
                yield pb.PortForwardFrame(eof=True)
            elif not chunk:
                yield pb.PortForwardFrame(connected=True)
            else:
                yield pb.PortForwardFrame(data=chunk)

    # --- health ---
    def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    def Version(self, request: empty_pb2.Empty, context: Any) -> pb.VersionResponse:
        return pb.VersionResponse(grpc_version=grpc.__version__, agent_version=__version__)


def serve(address: str, servicer: AgentServicer) -> grpc.Server:
    """Start a gRPC server on `address` (e.g. unix:/run/kata-py/agent.sock) and return it.

    Raises RuntimeError when the address cannot be bound.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="rpc"),
                         options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_AgentServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    return server
