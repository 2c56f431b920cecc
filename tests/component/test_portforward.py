"""Port forwarding without a VM: shim/portforward.py in a real netns with real iptables, over the real
GrpcAgent and the agent's real PortForward handler (agent/server.py + agent/portforward.py) on a unix
socket. The "guest loopback" is this host's: the servers the agent connects to listen on 127.0.0.1
and ::1 here, while the clients connect from inside the throw-away netns, exactly as containerd does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import trio

from agent import portforward as guest_pf
from agent.server import AgentServicer
from agent_client.grpc_client import GrpcAgent, connect_agent
from agent_client.transport import SerialTransport
from protos.agent.v1 import agent_pb2 as pb
from protos.agent.v1 import agent_pb2_grpc
from shim import portforward
from shim.network.netns import run_in_netns
from tests.support import owned

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables") is None,
                                reason="needs root and iptables")

BIG = 4 << 20


class PortForwardOnly(agent_pb2_grpc.AgentServicer):
    """The agent's own PortForward handler (unbound, it needs only `forwarder`) and a health check."""

    PortForward = AgentServicer.PortForward

    def __init__(self, max_connections: int = guest_pf.MAX_CONNECTIONS) -> None:
        self.forwarder = guest_pf.Forwarder(max_connections)

    def Check(self, request: Any, context: Any) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)


class HostileForward(PortForwardOnly):
    """Answers a PortForward with whatever `frames` says, then holds the call open."""

    frames: list[pb.PortForwardFrame] = []

    def PortForward(self, requests: Any, context: Any) -> Any:  # type: ignore[override]
        next(requests)
        yield from self.frames
        for _ in requests:
            pass


@pytest.fixture
def netns() -> Iterator[str]:
    name = owned.test_name("kppf-")  # the run's tag: the leak check knows it
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def serve_grpc(servicer: agent_pb2_grpc.AgentServicer) -> tuple[grpc.Server, str, str]:
    root = tempfile.mkdtemp(prefix="kppf-")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
    path = f"{root}/agent.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    return server, path, root


@pytest.fixture
async def agent_of() -> AsyncIterator[Callable[[agent_pb2_grpc.AgentServicer], Awaitable[GrpcAgent]]]:
    made: list[tuple[GrpcAgent, grpc.Server, str]] = []

    async def make(servicer: agent_pb2_grpc.AgentServicer) -> GrpcAgent:
        server, path, root = serve_grpc(servicer)
        agent = await connect_agent(SerialTransport(path), trio.current_time() + 5)
        made.append((agent, server, root))
        return agent

    try:
        yield make
    finally:
        for agent, server, root in made:
            await agent.aclose()
            assert agent.threads_in_use == 0
            assert agent.long_lived_in_use == 0, "a port-forward call kept its slot"
            server.stop(None).wait()
            shutil.rmtree(root, ignore_errors=True)


def nat_rules(netns: str, tool: str = "iptables") -> str:
    return subprocess.run(["ip", "netns", "exec", os.path.basename(netns), tool, "-t", "nat", "-S", "OUTPUT"],
                          capture_output=True, text=True, check=True).stdout


async def tcp_server(handler: Callable[[trio.SocketStream], Awaitable[None]], nursery: trio.Nursery,
                     host: str = "127.0.0.1") -> int:
    """A server on this host's loopback (the "guest's"); returns its port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=host))
    return int(listeners[0].socket.getsockname()[1])


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)
        await stream.send_eof()


async def connect_in(netns: str, port: int, family: int = 4) -> trio.SocketStream:
    """A connection made inside the netns to its loopback, as containerd makes it."""
    af, address = (socket.AF_INET, "127.0.0.1") if family == 4 else (socket.AF_INET6, "::1")
    raw = await trio.to_thread.run_sync(run_in_netns, netns, lambda: socket.socket(af, socket.SOCK_STREAM))
    sock = trio.socket.from_stdlib_socket(raw)
    try:
        await sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange(stream: trio.SocketStream, payload: bytes) -> bytes:
    """Send everything and half-close while reading until EOF."""
    got = bytearray()

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 100_000):
            await stream.send_all(view[i:i + 100_000])
        await stream.send_eof()

    async def receive() -> None:
        async for data in stream:
            got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    return bytes(got)


async def all_done(pf: portforward.PortForward) -> None:
    """Every connection's task ended (it resets or closes its socket before it counts down)."""
    with trio.fail_after(10):
        for _ in range(100_000):
            if not pf.live:
                return
            await trio.sleep(0.01)


async def start_forward(netns: str, agent: GrpcAgent, nursery: trio.Nursery,
                        **kwargs: Any) -> tuple[portforward.PortForward, trio.CancelScope]:
    pf = portforward.PortForward(netns, agent, **kwargs)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await pf.run(task_status=task_status)

    await nursery.start(run)
    return pf, scope


async def test_forwards_both_ways_byte_exact_with_half_close_and_cleans_up(netns: str, agent_of: Any) -> None:
    servicer = PortForwardOnly()
    agent = await agent_of(servicer)
    payload = os.urandom(BIG)
    async with trio.open_nursery() as nursery:
        port = await tcp_server(echo, nursery)
        pf, scope = await start_forward(netns, agent, nursery)
        assert portforward.COMMENT in nat_rules(netns)
        with trio.fail_after(120):
            got = await exchange(await connect_in(netns, port), payload)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert len(got) == BIG
        # several at once, each its own call
        with trio.fail_after(60):
            results: list[bytes] = []

            async def one(i: int) -> None:
                results.append(await exchange(await connect_in(netns, port), b"%d" % i * 1000))

            async with trio.open_nursery() as inner:
                for i in range(5):
                    inner.start_soon(one, i)
        assert sorted(results) == sorted(b"%d" % i * 1000 for i in range(5))
        listener_port = pf.ports[4]
        scope.cancel()
        nursery.cancel_scope.cancel()
    # no rule, no listener, no connection left
    assert portforward.COMMENT not in nat_rules(netns)
    with pytest.raises(ConnectionRefusedError):
        await connect_in(netns, listener_port)
    assert pf.live == 0 and pf.ports == {}
    assert servicer.forwarder._slots._value == servicer.forwarder.max_connections  # type: ignore[attr-defined]


async def test_guest_half_close_while_the_host_keeps_sending(netns: str, agent_of: Any) -> None:
    agent = await agent_of(PortForwardOnly())
    received = trio.Event()
    heard = bytearray()

    async def banner_then_listen(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello\n")
            await stream.send_eof()  # the server is done talking, still listening
            async for data in stream:
                heard.extend(data)
            received.set()

    async with trio.open_nursery() as nursery:
        port = await tcp_server(banner_then_listen, nursery)
        _pf, scope = await start_forward(netns, agent, nursery)
        with trio.fail_after(30):
            client = await connect_in(netns, port)
            got = bytearray()
            async for data in client:  # until the server's EOF
                got.extend(data)
            assert bytes(got) == b"hello\n"
            await client.send_all(b"world")  # our direction is still open
            await client.send_eof()
            await received.wait()
            await client.aclose()
        assert bytes(heard) == b"world"
        scope.cancel()
        nursery.cancel_scope.cancel()


async def test_a_refused_port_resets_the_connection(netns: str, agent_of: Any) -> None:
    agent = await agent_of(PortForwardOnly())
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    async with trio.open_nursery() as nursery:
        pf, scope = await start_forward(netns, agent, nursery)
        with trio.fail_after(30):
            client = await connect_in(netns, port)
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.receive_some(100)
            assert isinstance(info.value.__cause__, ConnectionResetError)
            await client.aclose()
        await all_done(pf)
        scope.cancel()


async def test_ipv6_loopback_is_forwarded_too(netns: str, agent_of: Any) -> None:
    if "::1" not in subprocess.check_output(  # noqa: ASYNC221 (a quick look)
            ["ip", "-n", os.path.basename(netns), "-6", "addr", "show", "lo"], text=True):
        pytest.skip("no IPv6 loopback here")
    agent = await agent_of(PortForwardOnly())
    async with trio.open_nursery() as nursery:
        port = await tcp_server(echo, nursery, host="::1")
        pf, scope = await start_forward(netns, agent, nursery)
        if 6 not in pf.ports:
            pytest.skip("ip6tables nat unavailable here")
        assert portforward.COMMENT in nat_rules(netns, "ip6tables")
        with trio.fail_after(30):
            assert await exchange(await connect_in(netns, port, family=6), b"over v6") == b"over v6"
            # a tcp4 client reaches a server that listens on ::1 only (containerd's fallback order)
            assert await exchange(await connect_in(netns, port, family=4), b"v4 to v6") == b"v4 to v6"
        scope.cancel()
        nursery.cancel_scope.cancel()
    assert portforward.COMMENT not in nat_rules(netns, "ip6tables")


async def test_connections_beyond_the_cap_are_reset(netns: str, agent_of: Any) -> None:
    agent = await agent_of(PortForwardOnly())
    hold = trio.Event()

    async def held(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"x")
            await hold.wait()

    async with trio.open_nursery() as nursery:
        port = await tcp_server(held, nursery)
        pf, scope = await start_forward(netns, agent, nursery, max_connections=2)
        with trio.fail_after(30):
            clients = [await connect_in(netns, port) for _ in range(2)]
            for c in clients:
                assert await c.receive_some(1) == b"x"
            with pytest.raises((trio.BrokenResourceError, ConnectionResetError)):
                extra = await connect_in(netns, port)  # the RST may come before connect() returns
                try:
                    await extra.receive_some(1)
                finally:
                    await extra.aclose()
        assert pf.live == 2
        hold.set()
        for c in clients:
            await c.aclose()
        scope.cancel()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("frames", [
    [pb.PortForwardFrame(data=b"early")],  # data before `connected`
    [pb.PortForwardFrame(connected=True), pb.PortForwardFrame(data=b"x" * (64 * 1024 + 1))],
    [pb.PortForwardFrame(connected=True), pb.PortForwardFrame(port=22)],
    [pb.PortForwardFrame(connected=True), pb.PortForwardFrame(eof=True), pb.PortForwardFrame(data=b"late")],
], ids=["data-first", "oversized", "names-a-port", "data-after-eof"])
async def test_hostile_guest_frames_reset_only_that_connection(netns: str, agent_of: Any,
                                                               frames: list[pb.PortForwardFrame]) -> None:
    servicer = HostileForward()
    servicer.frames = frames
    agent = await agent_of(servicer)
    async with trio.open_nursery() as nursery:
        pf, scope = await start_forward(netns, agent, nursery)
        with trio.fail_after(30):
            client = await connect_in(netns, 8080)
            got, reset = b"", False
            try:
                while data := await client.receive_some(1 << 20):
                    got += data
            except trio.BrokenResourceError:
                reset = True
            # a violation before the guest's eof resets the connection; one after it (the guest's
            # half-close reached the client already) is never delivered
            assert reset or frames[1].eof
            assert b"late" not in got and b"early" not in got and len(got) <= 64 * 1024
            await client.aclose()
        await all_done(pf)
        scope.cancel()
    assert threading.active_count() < 100


async def test_without_iptables_it_says_so(netns: str, agent_of: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = await agent_of(PortForwardOnly())
    monkeypatch.setattr(portforward.shutil, "which", lambda *a, **k: None)
    with pytest.raises(portforward.PortForwardUnavailable, match="iptables not found"):
        await portforward.PortForward(netns, agent).run()
    assert portforward.COMMENT not in nat_rules(netns)


@pytest.fixture
def netns_lo_down() -> Iterator[str]:
    name = owned.test_name("kppf-")  # the run's tag: the leak check knows it
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def test_a_netns_with_loopback_down_is_unavailable(netns_lo_down: str, agent_of: Any) -> None:
    agent = await agent_of(PortForwardOnly())
    with pytest.raises(portforward.PortForwardUnavailable, match="lo up"):
        await portforward.PortForward(netns_lo_down, agent).run()
    assert portforward.COMMENT not in nat_rules(netns_lo_down)


def test_guest_side_refuses_bad_targets_and_counts_connections() -> None:
    with pytest.raises(guest_pf.InvalidArgument):
        guest_pf.parse_target(0, 4)
    with pytest.raises(guest_pf.InvalidArgument):
        guest_pf.parse_target(70000, 4)
    with pytest.raises(guest_pf.InvalidArgument):
        guest_pf.parse_target(80, 5)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    try:
        fw = guest_pf.Forwarder(max_connections=1)
        target = guest_pf.parse_target(srv.getsockname()[1], 4)
        first = fw.forward(target, iter(()), lambda fn: None)
        assert next(first) == b""  # connected
        with pytest.raises(guest_pf.ResourceExhausted):
            next(fw.forward(target, iter(()), lambda fn: None))
        first.close()
        second = fw.forward(target, iter(()), lambda fn: None)
        assert next(second) == b""
        second.close()
    finally:
        srv.close()
    with pytest.raises(guest_pf.FailedPrecondition, match="refused"):
        next(guest_pf.Forwarder().forward(guest_pf.parse_target(target.port, 4), iter(()), lambda fn: None))
