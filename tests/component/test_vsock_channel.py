"""The vsock agent channel's gate, end to end: the agent's real AuthenticatedListener (agent/channel.py)
and the shim's real VsockTransport (agent_client/transport.py) with a real gRPC server behind the gate.

This host has no vhost-vsock and no vsock loopback (no vsock_loopback module: AF_VSOCK to CID 1 times
out, to our own CID gives ENODEV), so the stream runs over TCP on 127.0.0.1 instead of AF_VSOCK: the
same code with another address family. TCP keeps what matters here, a kernel that lets only
CAP_NET_BIND_SERVICE bind a port below 1024 (net.ipv4.ip_unprivileged_port_start is checked).
Real AF_VSOCK is exercised only as far as binding the guest's listener (test_vsock_guest.py boots the
guest: it reads its token through fw_cfg and listens).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from agent import channel
from agent_client.transport import VsockTransport, bind_privileged
from vmm.vsock import new_token

# Source ports the tests bind: few and obscure, so that a real service on this host is not in the way
PORTS = range(800, 900)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS
TIMEOUT = 10.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="binding ports below 1024 needs root"),
    pytest.mark.skipif(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() != "1024",
                       reason="this host lets anyone bind low ports: the privileged-port check proves nothing"),
]


class TcpTransport(VsockTransport):
    """The shim's VsockTransport, dialing 127.0.0.1:<port> instead of vsock <cid>:<port>."""

    _family = socket.AF_INET

    def _upstream(self) -> tuple[int, object]:
        return socket.AF_INET, ("127.0.0.1", self.port)

    def _local_address(self, port: int) -> object:
        return ("127.0.0.1", port)

    def _bind(self, sock: socket.socket) -> int:
        # TCP keeps a closed connection's port in TIME_WAIT for a minute (vsock has no such state)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return super()._bind(sock)


def _tcp_peer_ok(peer: tuple[str, int]) -> bool:
    return peer[1] < channel.PRIVILEGED_PORTS_BELOW  # vsock_peer_ok's port rule (the CID rule is unit-tested)


class Gate:
    """A gRPC server on a unix socket (Echo) and the agent's gate in front of it on 127.0.0.1."""

    def __init__(self, tmp: Path, token: bytes) -> None:
        self.token = token
        self.local = str(tmp / "agent.sock")
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", {"Echo": handler}),))
        self.server.add_insecure_port(f"unix:{self.local}")
        self.server.start()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self.listener = channel.AuthenticatedListener(listener, self.local, token, _tcp_peer_ok)
        self.listener.thread = threading.Thread(target=self.listener.serve, daemon=True)
        self.listener.thread.start()

    def transport(self) -> TcpTransport:
        return TcpTransport(3, self.port, token=self.token, source_ports=PORTS)

    def close(self) -> None:
        self.listener.stop()
        self.server.stop(grace=None).wait()


@pytest.fixture
def gate() -> Iterator[Gate]:
    tmp = Path(tempfile.mkdtemp(prefix="kp-vsock-"))
    g = Gate(tmp, new_token())
    try:
        yield g
    finally:
        g.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not [t for t in threading.enumerate() if t.name in ("vsock-conn", "vsock-down")], "threads left"


def echo(transport: TcpTransport, payload: bytes = b"hi") -> bytes:
    """One RPC through a fresh channel of `transport` (which the caller closes)."""
    ch = transport.open()
    try:
        return ch.unary_unary("/test.Echo/Echo")(payload, timeout=TIMEOUT, wait_for_ready=True)
    finally:
        ch.close()


@contextlib.contextmanager
def raw(port: int, *, privileged: bool) -> Iterator[socket.socket]:
    """A hand-made connection to the gate, from a privileged port or an ephemeral one."""
    for _ in range(20):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if privileged:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                bind_privileged(s, lambda p: ("127.0.0.1", p), PORTS)
            s.settimeout(TIMEOUT)
            s.connect(("127.0.0.1", port))
            break
        except OSError as e:  # EADDRNOTAVAIL: this port's connection to `port` is still in TIME_WAIT
            s.close()
            if e.errno != errno.EADDRNOTAVAIL:
                raise
    else:
        pytest.fail("no free source port to connect from")
    try:
        yield s
    finally:
        # RST instead of FIN: the low port does not linger in TIME_WAIT for a minute
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()


def answer(s: socket.socket) -> bytes:
    """What the other end says after our HTTP/2 preface: the gRPC server's SETTINGS if bridged,
    b"" (closed without a word) if refused."""
    try:
        s.sendall(H2_PREFACE)
        return s.recv(4096)
    except (BrokenPipeError, ConnectionResetError):  # closed before or while we wrote
        return b""


def send(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a refused peer may be cut already
        s.sendall(data)


def test_the_shims_transport_gets_through(gate: Gate) -> None:
    t = gate.transport()
    try:
        assert echo(t) == b"echo:hi"
        assert t.ever_connected()
    finally:
        t.close()


def test_a_raw_connection_with_port_and_token_is_bridged(gate: Gate) -> None:
    # the control for the refusals below: the same raw client gets an HTTP/2 answer when it may
    with raw(gate.port, privileged=True) as s:
        s.sendall(gate.token)
        assert answer(s)[3:4] == b"\x04"  # a SETTINGS frame from the gRPC server


def test_an_unprivileged_source_port_is_refused_even_with_the_token(gate: Gate) -> None:
    with raw(gate.port, privileged=False) as s:
        assert s.getsockname()[1] >= 1024
        send(s, gate.token)
        assert answer(s) == b""


@pytest.mark.parametrize("preamble", [b"", b"0" * 64, b"x", None])
def test_a_wrong_or_missing_token_is_refused(gate: Gate, preamble: bytes | None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # a missing token: the preface's 33 bytes are short of one, so the gate waits for the rest
    monkeypatch.setattr(channel, "_PREAMBLE_TIMEOUT", 1.0)
    with raw(gate.port, privileged=True) as s:
        if preamble is None:  # the right token but one digit off: compared whole, not by prefix
            preamble = gate.token[:-1] + (b"0" if gate.token[-1:] != b"0" else b"1")
        send(s, preamble)
        assert answer(s) == b""  # HTTP/2 bytes where the token should be are not a token either


def test_a_silent_or_slow_peer_is_dropped_after_the_preamble_timeout(gate: Gate,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "_PREAMBLE_TIMEOUT", 0.3)
    with raw(gate.port, privileged=True) as s:
        s.sendall(gate.token[:10])  # a drip that never completes
        start = time.monotonic()
        assert s.recv(10) == b""
        assert time.monotonic() - start < 3
    t = gate.transport()  # and the shim still gets in afterwards
    try:
        assert echo(t, b"ok") == b"echo:ok"
    finally:
        t.close()


def test_one_connection_at_a_time_and_reconnect_after_it_ends(gate: Gate) -> None:
    t = gate.transport()
    ch = t.open()
    try:
        call = ch.unary_unary("/test.Echo/Echo")
        assert call(b"1", timeout=TIMEOUT, wait_for_ready=True) == b"echo:1"
        # the shim's connection is live: a second one, token and all, is refused
        with raw(gate.port, privileged=True) as s:
            send(s, gate.token)
            assert answer(s) == b""
        # the shim's connection drops (the agent side is cut): grpc reconnects through the same
        # transport, and the gate lets it in once the old connection is gone
        live = gate.listener._live
        assert live is not None
        live.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + TIMEOUT
        while gate.listener._live is live and time.monotonic() < deadline:
            time.sleep(0.01)
        assert call(b"2", timeout=TIMEOUT, wait_for_ready=True) == b"echo:2"
        assert gate.listener._live is not None and gate.listener._live is not live
    finally:
        ch.close()
        t.close()
    # the shim closed its transport: the slot is free again for the next one
    deadline = time.monotonic() + TIMEOUT
    while gate.listener._live is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    t2 = gate.transport()
    try:
        assert echo(t2, b"3") == b"echo:3"
    finally:
        t2.close()


def test_handshakes_are_bounded(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "_PREAMBLE_TIMEOUT", 2.0)
    with contextlib.ExitStack() as stack:
        stalled = [stack.enter_context(raw(gate.port, privileged=True)) for _ in range(channel._MAX_HANDSHAKES)]
        time.sleep(0.2)  # let the gate take them in
        with raw(gate.port, privileged=True) as extra:  # over the limit: closed at once
            send(extra, gate.token)
            start = time.monotonic()
            assert answer(extra) == b""
            assert time.monotonic() - start < 1.5
        assert len(stalled) == channel._MAX_HANDSHAKES


def test_the_guest_listener_fails_closed_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no agent token"):
        channel.serve_vsock(2999, str(tmp_path / "agent.sock"), token_path=str(tmp_path / "none"))
    (tmp_path / "bad").write_bytes(b"short")
    with pytest.raises(ValueError):
        channel.serve_vsock(2999, str(tmp_path / "agent.sock"), token_path=str(tmp_path / "bad"))


def test_the_guest_listener_binds_real_af_vsock(tmp_path: Path) -> None:
    # what this host can do of real vsock: the listener, from its token file, on AF_VSOCK
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        probe.close()
    except OSError as e:
        pytest.skip(f"no AF_VSOCK here: {e}")
    (tmp_path / "raw").write_bytes(new_token())
    gate = channel.serve_vsock(2998, str(tmp_path / "agent.sock"), token_path=str(tmp_path / "raw"))
    try:
        assert gate.thread is not None and gate.thread.is_alive()
        other = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        with pytest.raises(OSError):  # it really holds the port
            other.bind((socket.VMADDR_CID_ANY, 2998))
        other.close()
    finally:
        gate.stop()
    assert not gate.thread.is_alive()
