"""ttrpc server against bad and awkward input.

Rules (containerd/ttrpc v1.1.1 server.go, services.go; protocols.md section 1): bad input never kills the
server; a problem with one stream is answered on that stream id and the connection stays usable;
oversized frame -> RESOURCE_EXHAUSTED; even stream id / undecodable Request -> INVALID_ARGUMENT;
undecodable payload -> INTERNAL; unknown service/method -> UNIMPLEMENTED "service X"/"method X";
StatusError(code) -> code; any other exception -> INTERNAL; timeout_nano is a deadline
(DEADLINE_EXCEEDED); calls run concurrently and answer out of order; peers of another user are refused.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import StringValue
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.interop.ttrpc_support import SERVICE, EchoService, RawPeer, request_frame, value_of
from ttrpc import (
    MAX_MESSAGE_LENGTH,
    Code,
    MessageType,
    Server,
    bind_unix_socket,
    encode_frame,
    listener_from_socket,
    open_client,
)
from ttrpc.codec import Request, decode_response, encode_request

TIMEOUT = 10  # seconds of real (or autojumped) time any single test may wait


@asynccontextmanager
async def connected(service: EchoService | None = None) -> AsyncIterator[RawPeer]:
    """One server connection over an in-memory stream; fails the test if the server task crashes.

    On exit the client side closes and the server must finish the connection by itself.
    """
    server = Server(require_same_user=False)  # memory streams have no peer credentials
    (service or EchoService()).register(server)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, server_stream)
            peer = RawPeer(client_stream)
            yield peer
            await client_stream.aclose()
    assert server.connections == 0


async def assert_still_serving(peer: RawPeer, stream_id: int = 101) -> None:
    await peer.send(request_frame(stream_id, "Echo", "still here"))
    sid, response = await peer.receive_response()
    assert (sid, value_of(response)) == (stream_id, "still here")


async def test_wait_no_connections_returns_when_the_last_peer_hangs_up() -> None:
    server = Server(require_same_user=False)
    EchoService().register(server)
    with trio.fail_after(TIMEOUT):
        await server.wait_no_connections()  # none yet: at once
        left, right = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, right)
            await trio.testing.wait_all_tasks_blocked()
            assert server.connections == 1
            with trio.move_on_after(0.05) as waited:
                await server.wait_no_connections()
            assert waited.cancelled_caught, "returned while a peer was connected"
            await left.aclose()
            await server.wait_no_connections()
            assert server.connections == 0


# --- framing ------------------------------------------------------------------------------------

async def test_echo() -> None:
    async with connected() as peer:
        await peer.send(request_frame(1, "Echo", "hi"))
        sid, response = await peer.receive_response()
        assert (sid, value_of(response)) == (1, "hi")


async def test_garbage_then_eof_closes_quietly() -> None:
    async with connected() as peer:
        # "hell" read as a length is > 4 MiB: the server skips it as an oversized frame, then EOF
        await peer.send(b"hello, this is not ttrpc at all")
        await peer.stream.send_eof()
        with pytest.raises(EOFError):
            await peer.receive_frame()


@settings(max_examples=50, deadline=None)
@given(junk=st.binary(min_size=1, max_size=200))
async def test_any_garbage_only_gets_well_formed_answers(junk: bytes) -> None:
    async with connected() as peer:
        await peer.send(junk)
        await peer.stream.send_eof()
        while True:
            try:
                frame = await peer.receive_frame()
            except EOFError:
                break
            assert frame.type == MessageType.RESPONSE
            assert decode_response(frame.payload).code in (Code.INVALID_ARGUMENT, Code.UNIMPLEMENTED,
                                                           Code.INTERNAL, Code.RESOURCE_EXHAUSTED)


async def test_truncated_frame_then_eof(caplog: pytest.LogCaptureFixture) -> None:
    async with connected() as peer:
        frame = request_frame(1, "Echo", "never finished")
        await peer.send(frame[:-3])
        await peer.stream.send_eof()
        with pytest.raises(EOFError):
            await peer.receive_frame()
    assert "truncated frame" in caplog.text


async def test_oversized_frame_answered_and_connection_kept() -> None:
    async with connected() as peer:
        length = MAX_MESSAGE_LENGTH + 1
        await peer.send(b"\x00\x40\x00\x01" b"\x00\x00\x00\x03" b"\x01\x00" + b"\0" * length)
        await peer.send(request_frame(5, "Echo", "next"))
        responses = await peer.receive_responses(2)
        assert responses[3].code == Code.RESOURCE_EXHAUSTED
        assert responses[3].message == "message length 4194305 exceed maximum message size of 4194304"
        assert value_of(responses[5]) == "next"


async def test_even_stream_id_is_invalid_argument() -> None:
    async with connected() as peer:
        await peer.send(request_frame(2, "Echo", "x"))
        sid, response = await peer.receive_response()
        assert (sid, response.code) == (2, Code.INVALID_ARGUMENT)
        assert response.message == "StreamID must be odd for client initiated streams"
        await assert_still_serving(peer)


async def test_undecodable_request_is_invalid_argument() -> None:
    async with connected() as peer:
        await peer.send(encode_frame(7, MessageType.REQUEST, b"\xff\xff\xff\xff"))
        sid, response = await peer.receive_response()
        assert (sid, response.code) == (7, Code.INVALID_ARGUMENT)
        await assert_still_serving(peer)


@pytest.mark.parametrize("msg_type", [MessageType.RESPONSE, MessageType.DATA, 0x7f])
async def test_frames_that_are_not_requests_are_ignored(msg_type: int) -> None:
    async with connected() as peer:
        await peer.send(encode_frame(9, msg_type, b"whatever"))
        await assert_still_serving(peer)  # the first answer is the Echo's, not one for stream 9


# --- dispatch -----------------------------------------------------------------------------------

async def test_undecodable_payload_is_internal() -> None:
    async with connected() as peer:
        await peer.send(encode_frame(1, MessageType.REQUEST,
                                     encode_request(Request(SERVICE, "Echo", b"\x0a\x05ab"))))
        _, response = await peer.receive_response()
        assert response.code == Code.INTERNAL
        assert response.message.startswith("ttrpc: error unmarshalling payload:")
        await assert_still_serving(peer)


async def test_unknown_service_and_method_are_unimplemented() -> None:
    async with connected() as peer:
        await peer.send(request_frame(1, "Echo", service="no.such.Service"))
        await peer.send(request_frame(3, "NoSuchMethod"))
        responses = await peer.receive_responses(2)
        assert (responses[1].code, responses[1].message) == (Code.UNIMPLEMENTED, "service no.such.Service")
        assert (responses[3].code, responses[3].message) == (Code.UNIMPLEMENTED, "method NoSuchMethod")


@pytest.mark.parametrize("code", [Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION,
                                  Code.UNAVAILABLE, Code.UNIMPLEMENTED, 42])
async def test_status_error_code_is_sent(code: int) -> None:
    async with connected() as peer:
        await peer.send(request_frame(1, "Fail", f"{int(code)}:container abc: not found"))
        _, response = await peer.receive_response()
        assert (response.code, response.message, response.payload) == (
            code, "container abc: not found", b"")


async def test_handler_exception_is_internal_and_server_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    async with connected() as peer:
        await peer.send(request_frame(1, "Boom"))
        _, response = await peer.receive_response()
        assert (response.code, response.message) == (Code.INTERNAL, "RuntimeError: boom")
        await assert_still_serving(peer)
    assert "kata.test.Echo/Boom failed" in caplog.text


async def test_response_over_the_limit_is_resource_exhausted() -> None:
    # a reply body just under 4 MiB whose envelope is just over it
    async with connected() as peer:
        await peer.send(request_frame(1, "Big", str(MAX_MESSAGE_LENGTH - 6)))
        _, response = await peer.receive_response()
        assert response.code == Code.RESOURCE_EXHAUSTED
        await assert_still_serving(peer)


async def test_response_at_the_limit_is_sent() -> None:
    async with connected() as peer:
        await peer.send(request_frame(1, "Big", str(MAX_MESSAGE_LENGTH - 10)))
        _, response = await peer.receive_response()
        assert len(value_of(response)) == MAX_MESSAGE_LENGTH - 10


# --- time and concurrency -----------------------------------------------------------------------

async def test_timeout_nano_is_a_deadline(autojump_clock: trio.testing.MockClock) -> None:
    service = EchoService()
    async with connected(service) as peer:
        start = trio.current_time()
        await peer.send(request_frame(1, "Sleep", "60", timeout_nano=2_000_000_000))
        _, response = await peer.receive_response()
        assert (response.code, response.message) == (Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        assert trio.current_time() - start == pytest.approx(2.0)
        assert service.cancelled.is_set()


async def test_negative_timeout_nano_is_already_expired(autojump_clock: trio.testing.MockClock) -> None:
    # Go's client sends deadline-now, which is negative when the deadline has passed
    async with connected() as peer:
        await peer.send(request_frame(1, "Sleep", "60", timeout_nano=-5))
        _, response = await peer.receive_response()
        assert response.code == Code.DEADLINE_EXCEEDED


async def test_no_timeout_means_no_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as peer:
        await peer.send(request_frame(1, "Sleep", "5"))  # mock seconds, under TIMEOUT
        _, response = await peer.receive_response()
        assert value_of(response) == "slept"


async def test_slow_call_does_not_block_fast_one(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as peer:
        await peer.send(request_frame(1, "Sleep", "5"))
        await peer.send(request_frame(3, "Echo", "fast"))
        sid, response = await peer.receive_response()
        assert (sid, value_of(response)) == (3, "fast")
        sid, response = await peer.receive_response()
        assert (sid, value_of(response)) == (1, "slept")


# --- real unix sockets --------------------------------------------------------------------------

@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@asynccontextmanager
async def unix_server(path: Path, service: EchoService, *, mode: int = 0o600,
                      require_same_user: bool = True) -> AsyncIterator[Server]:
    server = Server(require_same_user=require_same_user)
    service.register(server)
    listener = listener_from_socket(bind_unix_socket(str(path), mode=mode))
    async with listener, trio.open_nursery() as nursery:
        await nursery.start(server.serve, listener)
        yield server
        nursery.cancel_scope.cancel()


def test_bind_unix_socket_makes_a_0600_socket(sock_dir: Path) -> None:
    path = sock_dir / "s"
    sock = bind_unix_socket(str(path))
    try:
        st_ = path.stat()
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o600
        with pytest.raises(OSError) as exc:
            bind_unix_socket(str(path))
        assert exc.value.errno == 98  # EADDRINUSE
    finally:
        sock.close()


async def test_client_disconnect_mid_call_then_next_connection_works(sock_dir: Path) -> None:
    service = EchoService()
    path = sock_dir / "s"
    with trio.fail_after(TIMEOUT):
        async with unix_server(path, service) as server:
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(request_frame(1, "Sleep", "3600"))
            await service.started.wait()
            await stream.aclose()
            await service.cancelled.wait()  # in-flight handler cancelled, as Go cancels its ctx
            async with open_client(str(path)) as client:
                reply = await client.call(SERVICE, "Echo", StringValue(value="again"), StringValue)
                assert reply.value == "again"
                assert server.connections == 1


# The child runs Debian's /usr/bin/python3 (readable by every user) with no imports from this repo.
PEER_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
got = b""
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    while chunk := s.recv(65536):
        got += chunk
        if len(got) >= 10:
            break
except (ConnectionResetError, BrokenPipeError):  # a refused peer may see the close as a reset
    pass
print(len(got))
"""


async def run_peer(path: Path, as_user: str | None) -> int:
    """Bytes of answer a raw client gets, optionally running as another user via setpriv."""
    argv = ["/usr/bin/python3", "-c", PEER_SCRIPT, str(path), request_frame(1, "Echo", "x").hex()]
    if as_user is not None:
        argv = ["setpriv", f"--reuid={as_user}", f"--regid={pwd.getpwnam(as_user).pw_gid}",
                "--clear-groups", *argv]
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    return int(result.stdout)


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
    reason="needs root, setpriv and /usr/bin/python3 to run a peer as another user")


@pytest.fixture
def open_sock_dir(sock_dir: Path) -> Path:
    sock_dir.chmod(0o755)
    return sock_dir


@needs_setpriv
async def test_peer_of_another_user_is_refused(open_sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = open_sock_dir / "s"
    with trio.fail_after(TIMEOUT):
        # 0666 so that `nobody` may connect at all; the credential check is what must stop it
        async with unix_server(path, EchoService(), mode=0o666):
            assert await run_peer(path, as_user=None) > 0   # control: same user is answered
            assert await run_peer(path, as_user="nobody") == 0
    assert "rejecting peer uid=65534" in caplog.text


@needs_setpriv
async def test_require_same_user_off_serves_other_users(open_sock_dir: Path) -> None:
    path = open_sock_dir / "s"
    with trio.fail_after(TIMEOUT):
        async with unix_server(path, EchoService(), mode=0o666, require_same_user=False):
            assert await run_peer(path, as_user="nobody") > 0

