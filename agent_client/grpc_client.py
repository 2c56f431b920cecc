"""`GrpcAgent`: the `Agent` interface over the generated grpc stubs, and `connect_agent`.

This is the only module that sees agent wire types. grpc.aio is asyncio-bound, so each call starts on
the sync stub as a future/iterator and waits for it in a worker thread (`trio.to_thread.run_sync` with
abandon_on_cancel). When the trio scope is cancelled we call `call.cancel()`, which wakes that thread
at once, so no thread outlives the call it served. Unary calls carry a `timeout=` from `Deadlines`;
WaitProcess and the output/OOM streams have none (they block for as long as the process lives) but are
cancellable.

Two thread pools, so that blocked calls can never starve the ones that end them: control calls (every
unary RPC but WaitProcess: each has a deadline, so a full pool only makes the next one wait briefly)
and long-lived calls (WaitProcess and the streams: one wait + stdout + stderr per live process). The
long-lived ones are counted from the call's start to its end; when all their slots are taken a new one
fails at once with AgentUnavailable ("too many live processes"), never a hang, and CreateContainer /
ExecProcess refuse a process whose three calls would not fit. Kill, Delete and the rest keep working.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import trio
from google.protobuf import empty_pb2

from agent_client import portforward, validate
from agent_client.errors import (
    AgentAlreadyExists,
    AgentBadResponse,
    AgentError,
    AgentFailedPrecondition,
    AgentInternal,
    AgentInvalidArgument,
    AgentNotFound,
    AgentTimeout,
    AgentUnavailable,
    AgentUnimplemented,
)
from agent_client.protocol import (
    PORT_FORWARD_CHUNK,
    AgentVersion,
    ArpNeighbor,
    ContainerStats,
    CpuStats,
    GuestDetails,
    Interface,
    IPAddress,
    MemoryStats,
    OnlineResources,
    PidsStats,
    PortForwardStream,
    Route,
    Storage,
)
from agent_client.transport import Transport
from kata_trio import run_sync_abandoning
from protos.agent.v1 import agent_pb2 as pb
from protos.agent.v1 import agent_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
_EOF = object()
_MAX_MESSAGE_CHARS = 1024  # an agent error message longer than this is truncated
# The guest agent serves at most 128 RPCs at once (agent/server.py MAX_WORKERS; more queue there behind
# blocked ones): together these never exceed it, so a control RPC never waits behind streams in the
# guest either.
DEFAULT_CONTROL_THREADS = 32
DEFAULT_LONG_LIVED_CALLS = 96  # wait + stdout + stderr per live process (2 with a tty), + the OOM stream
CALLS_PER_PROCESS = 3


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Per-RPC-class deadlines in seconds. Generous: a TCG guest runs runc 10-50x slower than KVM."""

    control: float = 30.0
    create: float = 120.0  # CreateContainer/ExecProcess: mounts + runc create under TCG
    health: float = 5.0
    online: float = 60.0  # OnlineCPUMem(wait=True) polls sysfs until the CPUs show up
    remove_grace: float = 30.0  # added to RemoveContainer's own kill-and-wait timeout


_CODE_TO_ERROR: dict[grpc.StatusCode, type[AgentError]] = {
    grpc.StatusCode.NOT_FOUND: AgentNotFound,
    grpc.StatusCode.ALREADY_EXISTS: AgentAlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: AgentInvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: AgentInvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: AgentFailedPrecondition,
    grpc.StatusCode.UNIMPLEMENTED: AgentUnimplemented,
    grpc.StatusCode.UNAVAILABLE: AgentUnavailable,
    # we never see our own cancellations (trio raises Cancelled); any other means the channel closed
    grpc.StatusCode.CANCELLED: AgentUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AgentTimeout,
}


def sanitize_message(text: str | None) -> str:
    """Bound and de-control an agent-supplied message before it reaches logs and containerd."""
    text = text or ""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:_MAX_MESSAGE_CHARS])
    return cleaned + ("..." if len(text) > _MAX_MESSAGE_CHARS else "")


def error_from_status(method: str, code: grpc.StatusCode | None, details: str | None) -> AgentError:
    """Map a grpc status to our error class (unknown codes → AgentInternal). Never raises."""
    cls = _CODE_TO_ERROR.get(code, AgentInternal) if code is not None else AgentInternal
    message = sanitize_message(details) or (code.name.lower() if code is not None else "unknown error")
    return cls(message, method=method)


def _rpc_error(method: str, exc: grpc.RpcError) -> AgentError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return error_from_status(method, code, details)


def _storage(s: Storage) -> pb.Storage:
    return pb.Storage(
        driver=s.driver,
        driver_options=list(s.driver_options),
        source=s.source,
        fstype=s.fstype,
        options=list(s.options),
        mount_point=s.mount_point,
    )


def _family(family: int) -> pb.IPAddress.Family:
    return pb.IPAddress.V6 if family == 6 else pb.IPAddress.V4


def _ip_to_pb(a: IPAddress) -> pb.IPAddress:
    return pb.IPAddress(family=_family(a.family), address=a.address, mask=str(a.prefix_len))


def _ip_from_pb(a: pb.IPAddress) -> IPAddress:
    try:
        prefix = int(a.mask or 0)
    except ValueError:
        prefix = 0
    return IPAddress(a.address, prefix, 6 if a.family == pb.IPAddress.V6 else 4)


def _iface_to_pb(i: Interface) -> pb.Interface:
    return pb.Interface(name=i.name, hw_addr=i.hw_addr, mtu=i.mtu,
                        ip_addresses=[_ip_to_pb(a) for a in i.addresses])


def _iface_from_pb(i: pb.Interface) -> Interface:
    return Interface(name=i.name, hw_addr=i.hw_addr, mtu=i.mtu,
                     addresses=tuple(_ip_from_pb(a) for a in i.ip_addresses))


def _route_to_pb(r: Route) -> pb.Route:
    return pb.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
                    family=_family(r.family))


def _route_from_pb(r: pb.Route) -> Route:
    return Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
                 family=6 if r.family == pb.IPAddress.V6 else 4)


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _Stream(Generic[T]):
    """Async iterator over a server-streaming call; `aclose()` (or cancellation) cancels the call."""

    def __init__(self, agent: GrpcAgent, method: str, call: Any, convert: Callable[[Any], T | None]) -> None:
        """Takes over one of `agent._long_lived` slots (taken by the caller), given back when it ends."""
        self._agent = agent
        self._method = method
        self._call = call
        self._convert = convert  # None = drop this message
        self._done = False
        agent._calls.add(call)

    def __aiter__(self) -> _Stream[T]:
        return self

    async def __anext__(self) -> T:
        while not self._done:
            try:
                msg = await self._agent._wait(self._method, self._call, lambda: next(self._call, _EOF),
                                              self._agent._long_lived_threads)
                if msg is _EOF:
                    break
                value = self._convert(msg)
            except BaseException:
                self._finish()  # an error, bad data or our cancellation ends the stream for good
                raise
            if value is not None:
                return value
        self._finish()
        raise StopAsyncIteration

    def _finish(self) -> None:
        if not self._done:
            self._agent._long_lived.give_back()
        self._done = True
        self._call.cancel()
        self._agent._calls.discard(self._call)

    async def aclose(self) -> None:
        self._finish()

    def __del__(self) -> None:
        # A consumer that breaks out without aclose() must not leave the guest streaming forever.
        if not self._done:
            self._done = True
            self._call.cancel()
            self._agent._long_lived.give_back()


class _PortForward:
    """One live PortForward call (`GrpcAgent.port_forward`): frames in through `Requests`, out by
    `next(call)` in a long-lived worker thread, every guest frame checked by `GuestFrames`."""

    def __init__(self, agent: GrpcAgent, call: Any, requests: portforward.Requests) -> None:
        self._agent = agent
        self._call = call
        self._requests = requests
        self._frames = portforward.GuestFrames()
        self._ended = False
        token = trio.lowlevel.current_trio_token()
        # a sender waiting for credits would wait forever once grpc stops taking frames
        call.add_done_callback(lambda _call: _soon(token, self._on_end))

    def _on_end(self) -> None:
        self._ended = True
        self._requests.wake()

    def _end_error(self) -> AgentError:
        code, details = self._call.code(), self._call.details()
        if code == grpc.StatusCode.OK:
            return AgentBadResponse("port-forward: the guest ended the call before the host's eof")
        return error_from_status("PortForward", code, details)

    def _next_frame(self) -> pb.PortForwardFrame | None:
        """Blocks (in a worker thread) for the guest's next frame; None once the call ended."""
        frame: pb.PortForwardFrame | None = next(self._call, None)
        return frame

    async def _next(self) -> bytes | None:
        """The next guest frame's data (b"" for connected/eof), None once the call ended well."""
        msg = await self._agent._wait("PortForward", self._call, self._next_frame, self._agent._long_lived_threads)
        if msg is None:
            return None
        return self._frames.check(port=msg.port, family=msg.family, data=msg.data, connected=msg.connected,
                                  eof=msg.eof)

    async def connected(self) -> None:
        if await self._next() is None:
            raise AgentBadResponse("port-forward: the guest ended the call without connecting")

    async def send(self, data: bytes) -> None:
        if len(data) > PORT_FORWARD_CHUNK:
            raise ValueError(f"port-forward frame of {len(data)} bytes")
        if not self._ended:
            await self._requests.put(pb.PortForwardFrame(data=data))
        if self._ended:
            raise self._end_error()

    async def send_eof(self) -> None:
        self._requests.close()

    async def finish(self) -> None:
        """After both half-closes: wait until the guest ends the call, i.e. it wrote everything we
        sent (cancelling at once could drop the last frames). Raises AgentError."""
        if self._frames.eof and self._requests.closed:
            if await self._next() is not None:  # any frame after the guest's eof raised already
                raise AgentBadResponse("port-forward: guest frame after its eof")

    async def receive(self) -> bytes:
        while not self._frames.eof:
            data = await self._next()
            if data is None:  # no eof frame, yet a clean end: the guest broke the protocol
                raise AgentBadResponse("port-forward: the guest ended the call without its eof")
            if data:
                return data
        return b""


def _soon(token: trio.lowlevel.TrioToken, fn: Callable[[], None]) -> None:
    try:
        token.run_sync_soon(fn)
    except trio.RunFinishedError:
        pass


class _ThreadLimiter:
    """A CapacityLimiter that also lets aclose() wait until every worker thread has returned.

    trio releases a token only when its thread really ends (even after an abandoning cancel), so "no
    borrowed token" means "no thread of ours alive".
    """

    def __init__(self, total: int) -> None:
        self._limiter = trio.CapacityLimiter(total)
        self._idle = trio.Event()
        self._idle.set()

    @property
    def borrowed_tokens(self) -> int:
        return self._limiter.borrowed_tokens

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self._limiter.acquire_on_behalf_of(borrower)
        if self._idle.is_set():
            self._idle = trio.Event()

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(borrower)
        if not self._limiter.borrowed_tokens:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _Slots:
    """Counts the long-lived calls in flight (from the call's start to its end, not only while a thread
    waits on it); full means a clear error, never a wait: such calls may never end."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("need at least one long-lived call slot")
        self.total = total
        self.in_use = 0

    @property
    def free(self) -> int:
        return self.total - self.in_use

    def full_error(self, method: str, needed: int = 1) -> AgentUnavailable:
        return AgentUnavailable(
            f"too many live processes: {self.in_use} of {self.total} waits/streams in use "
            f"(a process needs {CALLS_PER_PROCESS}), {needed} more refused",
            method=method,
        )

    def take(self, method: str) -> None:
        """Raises AgentUnavailable when every slot is in use."""
        if self.in_use >= self.total:
            raise self.full_error(method)
        self.in_use += 1

    def give_back(self) -> None:
        self.in_use -= 1


class GrpcAgent:
    """`Agent` over a grpc channel. Use `connect_agent()` to get one that has answered a health check."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        deadlines: Deadlines = Deadlines(),
        control_threads: int = DEFAULT_CONTROL_THREADS,
        long_lived_calls: int = DEFAULT_LONG_LIVED_CALLS,
        transport: Transport | None = None,
    ) -> None:
        self._channel = channel
        self._stub = agent_pb2_grpc.AgentStub(channel)
        self._deadlines = deadlines
        self._transport = transport
        # Our own limiters, not trio's default one (40 threads, shared with the rest of the shim).
        self._control_threads = _ThreadLimiter(control_threads)
        self._long_lived = _Slots(long_lived_calls)
        # one thread per slot at most; a token outlives its slot only while an abandoned thread ends
        self._long_lived_threads = _ThreadLimiter(long_lived_calls)
        self._calls: set[Any] = set()  # grpc calls in flight, cancelled by aclose()
        self._closed = False

    @property
    def threads_in_use(self) -> int:
        """Worker threads of ours still alive (control and long-lived)."""
        return self._control_threads.borrowed_tokens + self._long_lived_threads.borrowed_tokens

    @property
    def long_lived_in_use(self) -> int:
        """Waits and streams in flight."""
        return self._long_lived.in_use

    async def wait_threads_idle(self) -> None:
        """Return once no worker thread of ours is alive."""
        await self._control_threads.wait_idle()
        await self._long_lived_threads.wait_idle()

    # --- plumbing ---

    async def _wait(self, method: str, call: Any, blocking: Callable[[], T], limiter: _ThreadLimiter) -> T:
        """Run `blocking` (which waits on `call`) in a worker thread; map grpc errors."""
        try:
            return await run_sync_abandoning(blocking, limiter=limiter, thread_name=f"agent {method}")
        except grpc.RpcError as exc:
            raise _rpc_error(method, exc) from None
        except grpc.FutureCancelledError:
            raise AgentUnavailable("call cancelled: agent client closed", method=method) from None
        except BaseException:
            call.cancel()  # trio cancelled us: wake the abandoned thread so it ends now
            raise

    async def _unary(self, method: str, request: Any, timeout: float | None, **kwargs: Any) -> Any:
        """A control call: it has a deadline, so its thread always ends."""
        if self._closed:
            raise AgentUnavailable("agent client closed", method=method)
        future = getattr(self._stub, method).future(request, timeout=timeout, **kwargs)
        self._calls.add(future)
        try:
            return await self._wait(method, future, future.result, self._control_threads)
        finally:
            self._calls.discard(future)

    async def _long_unary(self, method: str, request: Any) -> Any:
        """A unary call without a deadline (WaitProcess), in a long-lived slot."""
        if self._closed:
            raise AgentUnavailable("agent client closed", method=method)
        self._long_lived.take(method)
        try:
            future = getattr(self._stub, method).future(request)
            self._calls.add(future)
            try:
                return await self._wait(method, future, future.result, self._long_lived_threads)
            finally:
                self._calls.discard(future)
        finally:
            self._long_lived.give_back()

    def _stream(self, method: str, request: Any, convert: Callable[[Any], T | None]) -> _Stream[T]:
        if self._closed:
            raise AgentUnavailable("agent client closed", method=method)
        self._long_lived.take(method)
        try:
            call = getattr(self._stub, method)(request)
        except BaseException:
            self._long_lived.give_back()
            raise
        return _Stream(self, method, call, convert)

    def _admit_process(self, method: str) -> None:
        """Refuse a new process up front when its wait and streams would not fit (rather than start
        it and lose its output or exit status later). Raises AgentUnavailable."""
        if self._long_lived.free < CALLS_PER_PROCESS:
            raise self._long_lived.full_error(method, CALLS_PER_PROCESS)

    async def aclose(self) -> None:
        """Cancel every call in flight, close the channel and transport, and wait (up to 5 s) until no
        worker thread is left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for call in list(self._calls):
            call.cancel()
        self._channel.close()
        if self._transport is not None:
            self._transport.close()
        with trio.move_on_after(5):
            await self.wait_threads_idle()

    # --- sandbox ---

    async def create_sandbox(
        self, hostname: str, dns: Sequence[str], storages: Sequence[Storage], sandbox_id: str, machine_id: str
    ) -> None:
        req = pb.CreateSandboxRequest(
            hostname=hostname,
            dns=list(dns),
            storages=[_storage(s) for s in storages],
            sandbox_pidns=True,
            sandbox_id=sandbox_id,
            machine_id=machine_id,
        )
        await self._unary("CreateSandbox", req, self._deadlines.create)

    async def destroy_sandbox(self) -> None:
        await self._unary("DestroySandbox", pb.DestroySandboxRequest(), self._deadlines.control)

    async def guest_details(self) -> GuestDetails:
        r = await self._unary("GetGuestDetails", pb.GuestDetailsRequest(mem_block_size=True), self._deadlines.control)
        a = r.agent_details
        return GuestDetails(
            mem_block_size_bytes=validate.block_size(r.mem_block_size_bytes),
            online_cpus=validate.cpu_count(r.online_cpus, "GetGuestDetails"),
            mem_total_bytes=r.mem_total_bytes,
            kernel_release=validate.string(r.kernel_release, "kernel release"),
            agent_version=validate.string(a.version, "agent version"),
            oci_runtime=validate.string(a.oci_runtime, "OCI runtime name"),
            storage_handlers=validate.strings(a.storage_handlers, "storage handler"),
        )

    async def set_guest_datetime(self, t: float) -> None:
        sec = int(t // 1)
        req = pb.SetGuestDateTimeRequest(sec=sec, usec=int((t - sec) * 1_000_000))
        await self._unary("SetGuestDateTime", req, self._deadlines.control)

    async def reseed_random(self, data: bytes) -> None:
        await self._unary("ReseedRandomDev", pb.ReseedRandomDevRequest(data=data), self._deadlines.control)

    # --- containers ---

    async def create_container(
        self,
        cid: str,
        oci_spec: Mapping[str, Any],
        rootfs: Storage,
        storages: Sequence[Storage] = (),
        terminal: bool = False,
        stdin: bool = False,
    ) -> int:
        self._admit_process("CreateContainer")
        req = pb.CreateContainerRequest(
            container_id=cid,
            oci_spec_json=_json(oci_spec),
            storages=[_storage(s) for s in storages],
            rootfs=_storage(rootfs),
            terminal=terminal,
            stdin=stdin,
        )
        r = await self._unary("CreateContainer", req, self._deadlines.create)
        return validate.pid(r.pid, f"container {cid}")

    async def start_container(self, cid: str) -> None:
        await self._unary("StartContainer", pb.ContainerRequest(container_id=cid), self._deadlines.control)

    async def remove_container(self, cid: str, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("remove_container needs a positive timeout (the agent's 0 means forever)")
        req = pb.RemoveContainerRequest(container_id=cid, timeout_seconds=max(1, round(timeout)))
        await self._unary("RemoveContainer", req, timeout + self._deadlines.remove_grace)

    async def update_container(self, cid: str, linux_resources: Mapping[str, Any]) -> None:
        req = pb.UpdateContainerRequest(container_id=cid, linux_resources_json=_json(linux_resources))
        await self._unary("UpdateContainer", req, self._deadlines.control)

    async def stats_container(self, cid: str) -> ContainerStats:
        r = await self._unary("StatsContainer", pb.ContainerRequest(container_id=cid), self._deadlines.control)
        if len(r.cpu.percpu_usage_ns) > validate.MAX_CPUS:
            raise validate.AgentBadResponse(f"guest sent {len(r.cpu.percpu_usage_ns)} per-CPU counters")
        return ContainerStats(
            cpu=CpuStats(
                total_usage_ns=r.cpu.total_usage_ns,
                percpu_usage_ns=tuple(r.cpu.percpu_usage_ns),
                kernel_ns=r.cpu.usage_in_kernelmode_ns,
                user_ns=r.cpu.usage_in_usermode_ns,
            ),
            memory=MemoryStats(
                usage=r.memory.usage,
                max_usage=r.memory.max_usage,
                limit=r.memory.limit,
                cache=r.memory.cache,
                stats=validate.stat_map(dict(r.memory.stats), "memory.stat"),
            ),
            pids=PidsStats(current=r.pids.current, limit=r.pids.limit),
        )

    async def pause_container(self, cid: str) -> None:
        await self._unary("PauseContainer", pb.ContainerRequest(container_id=cid), self._deadlines.control)

    async def resume_container(self, cid: str) -> None:
        await self._unary("ResumeContainer", pb.ContainerRequest(container_id=cid), self._deadlines.control)

    async def list_processes(self, cid: str) -> list[int]:
        r = await self._unary("ListProcesses", pb.ContainerRequest(container_id=cid), self._deadlines.control)
        return validate.pids(r.pids, f"container {cid}")

    # --- processes ---

    async def exec_process(
        self, cid: str, exec_id: str, process: Mapping[str, Any], terminal: bool = False, stdin: bool = False
    ) -> int:
        self._admit_process("ExecProcess")
        req = pb.ExecProcessRequest(
            container_id=cid, exec_id=exec_id, process_json=_json(process), terminal=terminal, stdin=stdin
        )
        r = await self._unary("ExecProcess", req, self._deadlines.create)
        return validate.pid(r.pid, f"exec {cid}/{exec_id}")

    async def signal_process(self, cid: str, exec_id: str, signal: int, all: bool = False) -> None:
        req = pb.SignalProcessRequest(container_id=cid, exec_id=exec_id, signal=signal, all=all)
        await self._unary("SignalProcess", req, self._deadlines.control)

    async def wait_process(self, cid: str, exec_id: str) -> int:
        # No deadline: it returns when the process exits, which may be never; trio cancellation ends it.
        r = await self._long_unary("WaitProcess", pb.ProcessRequest(container_id=cid, exec_id=exec_id))
        return validate.exit_status(r.status, f"{cid}/{exec_id}")

    async def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int:
        req = pb.WriteStdinRequest(container_id=cid, exec_id=exec_id, data=data)
        r = await self._unary("WriteStdin", req, self._deadlines.control)
        return validate.accepted_len(r.len, len(data), f"{cid}/{exec_id} stdin")

    async def close_stdin(self, cid: str, exec_id: str) -> None:
        req = pb.ProcessRequest(container_id=cid, exec_id=exec_id)
        await self._unary("CloseStdin", req, self._deadlines.control)

    def _output(self, method: str, cid: str, exec_id: str) -> AsyncIterator[bytes]:
        what = f"{cid}/{exec_id} {method}"

        def convert(msg: pb.OutputChunk) -> bytes | None:
            # empty chunks are skipped: consumers may read b"" as EOF
            return validate.chunk(msg.data, what) or None

        return self._stream(method, pb.ProcessRequest(container_id=cid, exec_id=exec_id), convert)

    def read_stdout(self, cid: str, exec_id: str) -> AsyncIterator[bytes]:
        return self._output("ReadStdout", cid, exec_id)

    def read_stderr(self, cid: str, exec_id: str) -> AsyncIterator[bytes]:
        return self._output("ReadStderr", cid, exec_id)

    async def tty_win_resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        req = pb.TtyWinResizeRequest(container_id=cid, exec_id=exec_id, row=rows, column=cols)
        await self._unary("TtyWinResize", req, self._deadlines.control)

    # --- resources ---

    async def online_cpu_mem(self, nb_cpus: int, wait: bool) -> OnlineResources:
        req = pb.OnlineCPUMemRequest(wait=wait, nb_cpus=nb_cpus)
        r = await self._unary("OnlineCPUMem", req, self._deadlines.online)
        return OnlineResources(validate.cpu_count(r.online_cpus, "OnlineCPUMem"), r.mem_total_bytes)

    # --- network ---

    async def update_interface(self, interface: Interface) -> Interface:
        req = pb.UpdateInterfaceRequest(interface=_iface_to_pb(interface))
        return _iface_from_pb(await self._unary("UpdateInterface", req, self._deadlines.online))

    async def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        req = pb.UpdateRoutesRequest(routes=pb.Routes(routes=[_route_to_pb(r) for r in routes]))
        r = await self._unary("UpdateRoutes", req, self._deadlines.control)
        return [_route_from_pb(x) for x in r.routes]

    async def add_arp_neighbors(self, neighbors: Sequence[ArpNeighbor]) -> None:
        req = pb.AddARPNeighborsRequest(neighbors=[
            pb.ARPNeighbor(to_ip_address=_ip_to_pb(IPAddress(n.ip, 32 if n.family == 4 else 128, n.family)),
                           device=n.device, lladdr=n.lladdr, state=n.state, flags=n.flags)
            for n in neighbors])
        await self._unary("AddARPNeighbors", req, self._deadlines.control)

    async def list_interfaces(self) -> list[Interface]:
        r = await self._unary("ListInterfaces", empty_pb2.Empty(), self._deadlines.control)
        return [_iface_from_pb(i) for i in r.interfaces]

    async def list_routes(self) -> list[Route]:
        r = await self._unary("ListRoutes", empty_pb2.Empty(), self._deadlines.control)
        return [_route_from_pb(x) for x in r.routes]

    # --- port forwarding ---

    @asynccontextmanager
    async def port_forward(self, port: int, family: int = 4) -> AsyncIterator[PortForwardStream]:
        if self._closed:
            raise AgentUnavailable("agent client closed", method="PortForward")
        self._long_lived.take("PortForward")  # a live connection holds a guest thread, like a stream
        try:
            requests = portforward.Requests(pb.PortForwardFrame(port=port, family=family))
            call = self._stub.PortForward(requests)
            self._calls.add(call)
            try:
                stream = _PortForward(self, call, requests)
                with trio.move_on_after(self._deadlines.control) as scope:
                    await stream.connected()
                if scope.cancelled_caught:
                    raise AgentTimeout(f"port {port}: no answer from the guest", method="PortForward")
                yield stream
                with trio.move_on_after(self._deadlines.control):
                    await stream.finish()
            finally:
                requests.close()  # frees grpc's sending thread, whatever happened
                call.cancel()
                self._calls.discard(call)
        finally:
            self._long_lived.give_back()

    # --- events and health ---

    def oom_events(self) -> AsyncIterator[str]:
        return self._stream("GetOOMEvents", empty_pb2.Empty(), lambda m: validate.container_id(m.container_id))

    async def check(self) -> bool:
        r = await self._unary("Check", pb.CheckRequest(), self._deadlines.health)
        return r.status == pb.CheckResponse.SERVING

    async def version(self) -> AgentVersion:
        r = await self._unary("Version", empty_pb2.Empty(), self._deadlines.control)
        return AgentVersion(
            grpc_version=validate.string(r.grpc_version, "grpc version"),
            agent_version=validate.string(r.agent_version, "agent version"),
        )

    async def _check_once(self, timeout: float) -> bool:
        # wait_for_ready: wait for the connection inside this attempt rather than failing fast
        r = await self._unary("Check", pb.CheckRequest(), timeout, wait_for_ready=True)
        return r.status == pb.CheckResponse.SERVING


async def connect_agent(
    transport: Transport,
    deadline: float,
    *,
    attempt_timeout: float = 1.0,
    deadlines: Deadlines = Deadlines(),
    control_threads: int = DEFAULT_CONTROL_THREADS,
    long_lived_calls: int = DEFAULT_LONG_LIVED_CALLS,
) -> GrpcAgent:
    """Open `transport` and retry the health Check until the agent is SERVING.

    `deadline` is absolute, on trio's clock (`trio.current_time() + seconds`). Each attempt has its own
    short deadline; between attempts we back off from 50 ms to 500 ms. On failure everything opened is
    closed again.

    Raises:
        AgentUnavailable: the agent could not be reached (or said NOT_SERVING) before `deadline`.
        AgentTimeout: the agent's socket connected but it never answered before `deadline`.
    """
    what = transport.describe()
    try:
        channel = transport.open()
    except OSError as exc:
        transport.close()
        raise AgentUnavailable(f"cannot open {what}: {exc}", method="Check") from exc
    agent = GrpcAgent(channel, deadlines=deadlines, control_threads=control_threads,
                      long_lived_calls=long_lived_calls, transport=transport)
    start = trio.current_time()
    attempts, backoff, last = 0, 0.05, "no attempt made"
    try:
        while (remaining := deadline - trio.current_time()) > 0:
            attempts += 1
            try:
                if await agent._check_once(min(attempt_timeout, remaining)):
                    log.debug("agent at %s serving after %d attempt(s)", what, attempts)
                    return agent
                last = "agent answered NOT_SERVING"
            except (AgentUnavailable, AgentTimeout) as exc:
                last = exc.message
            await trio.sleep(min(backoff, max(0.0, deadline - trio.current_time())))
            backoff = min(backoff * 2, 0.5)
        waited = trio.current_time() - start
        if transport.ever_connected() and last != "agent answered NOT_SERVING":
            raise AgentTimeout(
                f"agent at {what} connected but did not answer a health check within {waited:.1f} s "
                f"({attempts} attempts; last: {last})",
                method="Check",
            )
        reason = transport.connect_error() or last
        raise AgentUnavailable(
            f"agent at {what} not reachable within {waited:.1f} s ({attempts} attempts; last: {reason})",
            method="Check",
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await agent.aclose()
        raise
