"""GrpcAgent and connect_agent against a real in-process grpc server on a unix socket.

The servicer below is scripted by each test. What these tests pin down: calls and their conversions
work, deadlines fire instead of hanging, cancelling a blocked call returns at once and frees both the
worker thread and the server-side RPC, connect_agent retries and fails clearly, a dead server gives
AgentUnavailable, the virtio-serial channel never reconnects, and guest output is checked.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from google.protobuf import empty_pb2

from agent_client.errors import (
    AgentBadResponse,
    AgentNotFound,
    AgentTimeout,
    AgentUnavailable,
)
from agent_client.grpc_client import Deadlines, GrpcAgent, connect_agent
from agent_client.protocol import Storage
from agent_client.transport import SerialTransport, VsockTransport, vsock_available
from protos.agent.v1 import agent_pb2 as pb
from protos.agent.v1 import agent_pb2_grpc

QUICK = 2.0  # seconds within which anything "prompt" must finish


class ScriptedAgent(agent_pb2_grpc.AgentServicer):
    """Answers from attributes the test sets; blocking RPCs notice when the client goes away."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.check_hangs = False
        self.create_pid = 42
        self.wait_status = 0
        self.exited = threading.Event()  # WaitProcess returns once set
        self.stdout_chunks: list[bytes] = [b"hello ", b"world\n"]
        self.stdout_eof = threading.Event()  # ReadStdout ends after its chunks once set
        self.oom_ids: list[str] = []
        self.write_len: int | None = None  # None = accept everything
        self.pids: list[int] = [1, 7]
        self.error: tuple[grpc.StatusCode, str] | None = None  # fail the next call with this
        self.blocked = threading.Semaphore(0)  # released each time a blocking RPC starts waiting
        self.blocking_active = 0  # blocking RPCs still running on the server
        self.idle = threading.Condition()  # guards blocking_active

    def _record(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.append((name, request))
        if self.error is not None:
            code, msg = self.error
            self.error = None
            context.abort(code, msg)

    def _block_until(self, event: threading.Event, context: grpc.ServicerContext) -> None:
        with self.idle:
            self.blocking_active += 1
        self.blocked.release()
        try:
            while context.is_active() and not event.wait(0.01):
                pass
        finally:
            with self.idle:
                self.blocking_active -= 1
                self.idle.notify_all()

    def Check(self, request, context):
        self._record("Check", request, context)
        if self.check_hangs:
            self._block_until(threading.Event(), context)
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    def Version(self, request, context):
        self._record("Version", request, context)
        return pb.VersionResponse(grpc_version="1.85", agent_version="0.1.0")

    def CreateContainer(self, request, context):
        self._record("CreateContainer", request, context)
        return pb.CreateContainerResponse(pid=self.create_pid)

    def StartContainer(self, request, context):
        self._record("StartContainer", request, context)
        return empty_pb2.Empty()

    def ListProcesses(self, request, context):
        self._record("ListProcesses", request, context)
        return pb.ListProcessesResponse(pids=self.pids)

    def WaitProcess(self, request, context):
        self._record("WaitProcess", request, context)
        self._block_until(self.exited, context)
        return pb.WaitProcessResponse(status=self.wait_status)

    def ExecProcess(self, request, context):
        self._record("ExecProcess", request, context)
        return pb.CreateContainerResponse(pid=self.create_pid)

    def SignalProcess(self, request, context):
        self._record("SignalProcess", request, context)
        return empty_pb2.Empty()

    def RemoveContainer(self, request, context):
        self._record("RemoveContainer", request, context)
        return empty_pb2.Empty()

    def WriteStdin(self, request, context):
        self._record("WriteStdin", request, context)
        return pb.WriteStdinResponse(len=len(request.data) if self.write_len is None else self.write_len)

    def ReadStdout(self, request, context):
        self._record("ReadStdout", request, context)
        for chunk in self.stdout_chunks:
            yield pb.OutputChunk(data=chunk)
        self._block_until(self.stdout_eof, context)

    def ReadStderr(self, request, context):
        self._record("ReadStderr", request, context)
        self._block_until(self.stdout_eof, context)
        yield from ()

    def GetOOMEvents(self, request, context):
        self._record("GetOOMEvents", request, context)
        for cid in self.oom_ids:
            yield pb.OOMEvent(container_id=cid)
        self._block_until(threading.Event(), context)

    def GetGuestDetails(self, request, context):
        self._record("GetGuestDetails", request, context)
        return pb.GuestDetailsResponse(
            mem_block_size_bytes=128 << 20,
            online_cpus=2,
            mem_total_bytes=2 << 30,
            kernel_release="6.1.0-18-amd64",
            agent_details=pb.AgentDetails(version="0.1.0", storage_handlers=["9p", "blk"], oci_runtime="runc"),
        )


class AgentServer:
    """The scripted servicer served on a unix socket; start()/stop() may be called more than once."""

    def __init__(self, root: Path) -> None:
        self.servicer = ScriptedAgent()
        self.path = str(root / "agent.sock")
        self._server: grpc.Server | None = None

    def start(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        agent_pb2_grpc.add_AgentServicer_to_server(self.servicer, self._server)
        self._server.add_insecure_port(f"unix:{self.path}")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None


def bridge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("agent-bridge")]


@pytest.fixture
def server() -> Iterator[AgentServer]:
    root = Path(tempfile.mkdtemp(prefix="kpa-"))  # short: unix socket paths are limited to 108 bytes
    srv = AgentServer(root)
    srv.start()
    try:
        yield srv
    finally:
        srv.servicer.exited.set()
        srv.servicer.stdout_eof.set()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not bridge_threads(), "a bridge thread outlived its agent"


@pytest.fixture
async def agent(server: AgentServer) -> AsyncIterator[GrpcAgent]:
    a = await connect_agent(SerialTransport(server.path), trio.current_time() + 5)
    try:
        yield a
    finally:
        await a.aclose()
        assert a.threads_in_use == 0, "a worker thread outlived aclose()"


async def wait_server_idle(servicer: ScriptedAgent) -> None:
    """The server-side RPC noticed the client went away (the guest is not left streaming)."""

    def idle() -> bool:
        with servicer.idle:
            return servicer.idle.wait_for(lambda: servicer.blocking_active == 0, QUICK)

    assert await trio.to_thread.run_sync(idle), "server-side RPC still running"


async def blocked(servicer: ScriptedAgent) -> None:
    """Wait until a blocking RPC has started on the server."""
    assert await trio.to_thread.run_sync(servicer.blocked.acquire, True, QUICK), "RPC never reached the server"


# --- calls and conversions ---


async def test_calls_round_trip(agent: GrpcAgent, server: AgentServer) -> None:
    assert await agent.check() is True
    assert (await agent.version()).agent_version == "0.1.0"
    details = await agent.guest_details()
    assert (details.mem_block_size_bytes, details.online_cpus, details.oci_runtime) == (128 << 20, 2, "runc")
    assert details.storage_handlers == ("9p", "blk")
    rootfs = Storage("9p", "kataShared", "/run/kata-py/shared/containers/c1/rootfs", options=("ro",))
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}
    assert await agent.create_container("c1", spec, rootfs, stdin=True) == 42
    name, req = server.servicer.requests[-1]
    assert name == "CreateContainer"
    assert json.loads(req.oci_spec_json) == spec
    assert (req.rootfs.driver, req.rootfs.mount_point, list(req.rootfs.options)) == (
        "9p",
        rootfs.mount_point,
        ["ro"],
    )
    assert req.stdin and not req.terminal
    assert await agent.list_processes("c1") == [1, 7]
    assert await agent.write_stdin("c1", "", b"abc") == 3


async def test_agent_errors_are_mapped_with_message(agent: GrpcAgent, server: AgentServer) -> None:
    server.servicer.error = (grpc.StatusCode.NOT_FOUND, "container c9 not found")
    with pytest.raises(AgentNotFound) as info:
        await agent.start_container("c9")
    assert info.value.message == "container c9 not found"
    assert info.value.method == "StartContainer"


async def test_stdout_streams_until_eof(agent: GrpcAgent, server: AgentServer) -> None:
    server.servicer.stdout_chunks = [b"a", b"", b"b"]  # the empty chunk is not passed on
    server.servicer.stdout_eof.set()
    with trio.fail_after(QUICK):
        async with aclosing(agent.read_stdout("c1", "")) as chunks:
            assert [c async for c in chunks] == [b"a", b"b"]


async def test_wait_process_returns_the_status(agent: GrpcAgent, server: AgentServer) -> None:
    server.servicer.wait_status = 7
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, lambda: (time.sleep(0.1), server.servicer.exited.set()))
        with trio.fail_after(QUICK):
            assert await agent.wait_process("c1", "") == 7


# --- deadlines and cancellation ---


async def test_deadline_fires_instead_of_hanging(server: AgentServer) -> None:
    fast = await connect_agent(SerialTransport(server.path), trio.current_time() + 5, deadlines=Deadlines(health=0.2))
    try:
        server.servicer.check_hangs = True
        start = trio.current_time()
        with pytest.raises(AgentTimeout):
            await fast.check()
        assert trio.current_time() - start < QUICK
        await wait_server_idle(server.servicer)
    finally:
        await fast.aclose()


async def test_cancelling_a_blocked_wait_returns_at_once_and_frees_the_thread(
    agent: GrpcAgent, server: AgentServer
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.wait_process, "c1", "")
        await blocked(server.servicer)
        assert (agent.threads_in_use, agent.long_lived_in_use) == (1, 1)
        start = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start < 0.5
    with trio.fail_after(QUICK):
        await agent.wait_threads_idle()
    assert agent.long_lived_in_use == 0
    await wait_server_idle(server.servicer)
    assert await agent.check() is True  # the channel is still good for other calls


async def test_cancelling_a_stream_frees_thread_and_server(agent: GrpcAgent, server: AgentServer) -> None:
    got = []
    with trio.move_on_after(0.3) as scope:
        async for chunk in agent.read_stdout("c1", ""):
            got.append(chunk)
    assert scope.cancelled_caught
    assert b"".join(got) == b"hello world\n"
    with trio.fail_after(QUICK):
        await agent.wait_threads_idle()
    await wait_server_idle(server.servicer)


async def test_aclose_ends_blocked_calls_with_unavailable(server: AgentServer) -> None:
    a = await connect_agent(SerialTransport(server.path), trio.current_time() + 5)
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await a.wait_process("c1", "")
        except AgentUnavailable as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await blocked(server.servicer)
        with trio.fail_after(QUICK):
            await a.aclose()
    assert len(errors) == 1
    assert a.threads_in_use == 0
    assert not bridge_threads()
    with pytest.raises(AgentUnavailable, match="closed"):
        await a.check()
    await a.aclose()  # idempotent


# --- thread pools: blocked waits and streams never starve control calls ---


async def test_full_long_lived_pool_fails_fast_and_control_calls_still_run(server: AgentServer) -> None:
    a = await connect_agent(SerialTransport(server.path), trio.current_time() + 5, control_threads=2,
                            long_lived_calls=4)
    try:
        async with trio.open_nursery() as nursery:
            # every long-lived slot taken: two waits and two output streams of "live processes"
            for _ in range(2):
                nursery.start_soon(a.wait_process, "c1", "")
            streams = [a.read_stdout("c1", ""), a.read_stderr("c1", "")]
            for _ in range(4):
                await blocked(server.servicer)
            assert a.long_lived_in_use == 4
            with trio.fail_after(QUICK):
                with pytest.raises(AgentUnavailable, match="too many live processes: 4 of 4"):
                    await a.wait_process("c1", "")
                with pytest.raises(AgentUnavailable, match="too many live processes"):
                    a.read_stdout("c2", "")
                with pytest.raises(AgentUnavailable, match="too many live processes"):
                    await a.exec_process("c1", "e1", {"args": ["true"]})
                assert not any(name == "ExecProcess" for name, _ in server.servicer.requests)
                # what ends them still runs, more of them at once than the control pool has threads
                async with trio.open_nursery() as kills:
                    for _ in range(5):
                        kills.start_soon(a.signal_process, "c1", "", 9)
                await a.remove_container("c1", timeout=1)
                assert a.long_lived_in_use == 4
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
            assert a.long_lived_in_use == 2
            server.servicer.exited.set()  # the waits end by themselves
        assert a.long_lived_in_use == 0
        assert await a.exec_process("c1", "e2", {"args": ["true"]}) == 42  # room again
    finally:
        await a.aclose()
    assert a.threads_in_use == 0
    assert [name for name, _ in server.servicer.requests].count("SignalProcess") == 5


async def test_a_stream_dropped_without_aclose_gives_its_slot_back(agent: GrpcAgent, server: AgentServer) -> None:
    stream = agent.read_stdout("c1", "")
    assert agent.long_lived_in_use == 1
    first = await stream.__anext__()
    assert first == b"hello "
    del stream  # the consumer forgot it: the guest must not stream on, the slot must come back
    gc.collect()
    assert agent.long_lived_in_use == 0
    await wait_server_idle(server.servicer)


# --- connect_agent ---


async def test_connect_retries_until_the_agent_appears(server: AgentServer) -> None:
    server.stop()

    async def start_late() -> None:
        await trio.sleep(0.5)
        server.start()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start_late)
        with trio.fail_after(5):
            a = await connect_agent(SerialTransport(server.path), trio.current_time() + 4)
    try:
        assert await a.check() is True
        assert len([r for r in server.servicer.requests if r[0] == "Check"]) >= 1
    finally:
        await a.aclose()


async def test_connect_to_a_missing_agent_fails_clearly(server: AgentServer) -> None:
    server.stop()
    start = trio.current_time()
    with pytest.raises(AgentUnavailable) as info:
        await connect_agent(SerialTransport(server.path), trio.current_time() + 1.0)
    assert 0.9 < trio.current_time() - start < QUICK
    assert "not reachable" in str(info.value) and server.path in str(info.value)
    assert "FileNotFoundError" in str(info.value)
    assert not bridge_threads()


async def test_connect_to_a_hung_agent_times_out_clearly(server: AgentServer) -> None:
    server.servicer.check_hangs = True
    start = trio.current_time()
    with pytest.raises(AgentTimeout, match="did not answer a health check"):
        await connect_agent(SerialTransport(server.path), trio.current_time() + 1.0, attempt_timeout=0.3)
    assert trio.current_time() - start < QUICK
    await wait_server_idle(server.servicer)


async def test_vsock_without_a_guest_fails_clearly() -> None:
    # Whatever this host has (no vhost-vsock here), cid 4242 has no agent listening.
    start = trio.current_time()
    with pytest.raises(AgentUnavailable, match="vsock:4242:1024"):
        await connect_agent(VsockTransport(4242, token=b"0" * 64), trio.current_time() + 0.5)
    assert trio.current_time() - start < 1.0  # closing aborts the kernel's 2 s vsock connect
    assert not bridge_threads()


def test_vsock_transport_basics() -> None:
    with pytest.raises(ValueError):
        VsockTransport(2, token=b"0" * 64)
    assert VsockTransport(3, token=b"0" * 64).describe() == "vsock:3:1024"
    assert vsock_available() == Path("/dev/vhost-vsock").exists()


# --- a dead agent, and the one-connection rule of virtio-serial ---


async def test_server_killed_mid_stream_gives_unavailable(agent: GrpcAgent, server: AgentServer) -> None:
    async def kill_soon() -> None:
        await blocked(server.servicer)
        await trio.to_thread.run_sync(server.stop)

    with trio.fail_after(QUICK):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            with pytest.raises(AgentUnavailable):
                async for _ in agent.read_stdout("c1", ""):
                    pass


async def test_serial_channel_never_reconnects(agent: GrpcAgent, server: AgentServer) -> None:
    await trio.to_thread.run_sync(server.stop)
    with pytest.raises(AgentUnavailable):
        await agent.check()
    server.start()  # a "new" peer on the same socket: mixing byte streams would corrupt both
    seen = len(server.servicer.requests)
    for _ in range(3):
        with pytest.raises(AgentUnavailable):
            await agent.check()
        await trio.sleep(0.2)  # give grpc's reconnect back-off a chance to try
    assert len(server.servicer.requests) == seen, "the client reconnected to the agent socket"


# --- untrusted guest output ---


async def test_pid_zero_is_an_error(agent: GrpcAgent, server: AgentServer) -> None:
    server.servicer.create_pid = 0
    with pytest.raises(AgentBadResponse, match="impossible pid 0"):
        await agent.create_container("c1", {}, Storage("9p", "s", "/run/kata-py/m"))
    server.servicer.pids = [3, 0]
    with pytest.raises(AgentBadResponse):
        await agent.list_processes("c1")


@pytest.mark.parametrize(("sent", "reported"), [(-1, 255), (1000, 255), (137, 137)])
async def test_absurd_exit_status_is_clamped(agent: GrpcAgent, server: AgentServer, sent: int, reported: int) -> None:
    server.servicer.wait_status = sent
    server.servicer.exited.set()
    assert await agent.wait_process("c1", "") == reported


async def test_overlong_stdin_ack_and_chunk_are_errors(agent: GrpcAgent, server: AgentServer) -> None:
    server.servicer.write_len = 10
    with pytest.raises(AgentBadResponse, match="accepted 10 of 3"):
        await agent.write_stdin("c1", "", b"abc")
    server.servicer.stdout_chunks = [b"x" * ((1 << 20) + 1)]
    with pytest.raises(AgentBadResponse, match="output chunk"):
        async for _ in agent.read_stdout("c1", ""):
            pass
    await wait_server_idle(server.servicer)


async def test_oom_events_drop_invalid_ids(agent: GrpcAgent, server: AgentServer) -> None:
    server.servicer.oom_ids = ["c1", "../../etc/passwd", "x" * 500, "c2"]
    seen = []
    with trio.fail_after(QUICK):
        async with aclosing(agent.oom_events()) as events:
            async for cid in events:
                seen.append(cid)
                if len(seen) == 2:
                    break
    assert seen == ["c1", "c2"]
    await wait_server_idle(server.servicer)
