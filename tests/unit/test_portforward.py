"""Port forwarding's pure parts: the iptables rule, SO_ORIGINAL_DST parsing, the guest-frame checker,
the request feed, the fake agent's connections, and that the fake and the real client offer the same
call. The real path (netns, iptables, grpc, the agent's handler) is tests/component/test_portforward.py."""

from __future__ import annotations

import inspect
import socket
import struct

import pytest
import trio

from agent_client.errors import AgentBadResponse, AgentFailedPrecondition, AgentInternal
from agent_client.fake import FakeAgent, FakeConnection
from agent_client.grpc_client import GrpcAgent
from agent_client.portforward import GuestFrames, Requests
from agent_client.protocol import PORT_FORWARD_CHUNK, Agent
from shim import portforward


def test_redirect_rule_sends_loopback_tcp_but_our_own_port_to_us() -> None:
    assert portforward.iptables_argv("/usr/sbin/iptables", "-A", 4, 40001) == [
        "/usr/sbin/iptables", "-w", "5", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1",
        "!", "--dport", "40001", "-m", "comment", "--comment", "kata-py port-forward",
        "-j", "REDIRECT", "--to-ports", "40001"]
    rule = portforward.redirect_rule(6, 5)
    assert rule[rule.index("-d") + 1] == "::1" and rule[-1] == "5"


def test_original_port_reads_sockaddr_in_and_in6() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("127.0.0.1") + bytes(8)
    assert portforward.original_port(4, v4) == 8080
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + bytes(4)
          + socket.inet_pton(socket.AF_INET6, "::1") + bytes(4))
    assert portforward.original_port(6, v6) == 443
    with pytest.raises(ValueError):
        portforward.original_port(4, v4[:8])
    with pytest.raises(ValueError):
        portforward.original_port(6, v4 + bytes(12))  # an AF_INET address where AF_INET6 belongs


def _frame(**kw: object) -> dict[str, object]:
    return {"port": 0, "family": 0, "data": b"", "connected": False, "eof": False, **kw}


def test_guest_frames_follow_the_protocol() -> None:
    f = GuestFrames()
    assert f.check(**_frame(connected=True)) == b""  # type: ignore[arg-type]
    assert f.check(**_frame(data=b"abc")) == b"abc"  # type: ignore[arg-type]
    assert f.check(**_frame(data=b"x" * PORT_FORWARD_CHUNK)) == b"x" * PORT_FORWARD_CHUNK  # type: ignore[arg-type]
    assert f.check(**_frame(eof=True)) == b""  # type: ignore[arg-type]
    assert f.eof


@pytest.mark.parametrize("frames", [
    [_frame(data=b"x")],  # before connected
    [_frame(connected=True, data=b"x")],
    [_frame(connected=True), _frame(connected=True)],
    [_frame(connected=True), _frame(data=b"x" * (PORT_FORWARD_CHUNK + 1))],
    [_frame(connected=True), _frame()],  # empty
    [_frame(connected=True), _frame(eof=True, data=b"x")],
    [_frame(connected=True), _frame(eof=True), _frame(data=b"x")],
    [_frame(connected=True), _frame(eof=True), _frame(eof=True)],
    [_frame(connected=True, port=22)],  # the guest never names a port
    [_frame(connected=True), _frame(data=b"x", family=4)],
])
def test_guest_frames_out_of_order_or_oversized_are_refused(frames: list[dict[str, object]]) -> None:
    f = GuestFrames()
    with pytest.raises(AgentBadResponse):
        for frame in frames:
            f.check(**frame)  # type: ignore[arg-type]


async def test_requests_bound_what_waits_and_end_at_close() -> None:
    r = Requests("first", window=2)
    await r.put("a")
    await r.put("b")
    with trio.move_on_after(0.1) as scope:
        await r.put("c")  # no credit left until grpc takes a frame
    assert scope.cancelled_caught
    taken = await trio.to_thread.run_sync(lambda: [next(r), next(r)])
    assert taken == ["first", "a"]
    await trio.lowlevel.checkpoint()  # the credit comes back through the trio token
    with trio.fail_after(1):
        await r.put("c")
    r.close()
    r.close()  # idempotent
    rest = await trio.to_thread.run_sync(lambda: list(r))
    assert rest == ["b", "c"]
    assert await trio.to_thread.run_sync(lambda: list(r)) == []  # ended for good
    with pytest.raises(RuntimeError):
        await r.put("late")


async def test_fake_port_forward_echoes_refuses_and_breaks() -> None:
    fake = FakeAgent()
    fake.listen(8080)
    async with fake.port_forward(8080) as conn:
        await conn.send(b"ping")
        assert await conn.receive() == b"ping"
        await conn.send_eof()
        assert await conn.receive() == b""
    assert fake.forwarded_live == 0
    with pytest.raises(AgentFailedPrecondition, match="refused"):
        async with fake.port_forward(9090):
            pass

    async def broken(c: FakeConnection) -> None:
        await c.send(b"hi")
        raise OSError("reset")

    fake.listen(7070, broken)
    async with fake.port_forward(7070, 6) as conn:
        assert await conn.receive() == b"hi"
        with pytest.raises(AgentInternal, match="reset"):
            await conn.receive()
    assert [c.args for c in fake.calls if c.method == "port_forward"] == [(8080, 4), (9090, 4), (7070, 6)]


def test_fake_and_real_offer_the_same_port_forward() -> None:
    assert isinstance(FakeAgent(), Agent)
    for name in ("port_forward",):
        assert inspect.signature(getattr(FakeAgent, name)) == inspect.signature(getattr(GrpcAgent, name))
        assert str(inspect.signature(getattr(Agent, name))).split(" ->")[0] == \
            str(inspect.signature(getattr(GrpcAgent, name))).split(" ->")[0]
