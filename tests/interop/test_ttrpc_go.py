"""Interop with containerd/ttrpc 1.1.1 (Go), the version containerd 1.6.20 speaks to shims.

Our client against the Go server, and the Go client against our server: payloads, status codes and
messages, metadata and deadlines must come out as each side's own peer would produce them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.wrappers_pb2 import StringValue

from ttrpc import (
    MAX_MESSAGE_LENGTH,
    Code,
    Server,
    StatusError,
    bind_unix_socket,
    listener_from_socket,
    open_client,
)

from .gopeer import SERVICE
from .ttrpc_support import EchoService, RawPeer, request_frame, value_of

pytestmark = pytest.mark.go

TIMEOUT = 20


# --- our client -> Go server --------------------------------------------------------------------

async def call_go(socket: str, method: str, value: str, **kwargs: Any) -> str:
    with trio.fail_after(TIMEOUT):
        async with open_client(socket) as client:
            reply = await client.call(SERVICE, method, StringValue(value=value), StringValue, **kwargs)
    return reply.value


@pytest.mark.parametrize("value", ["", "hello", "ü" * 10, "x" * (1 << 20)])
async def test_echo_via_go_server(go_server_socket: str, value: str) -> None:
    assert await call_go(go_server_socket, "Echo", value) == value


@pytest.mark.parametrize("code", [Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION,
                                  Code.INVALID_ARGUMENT, Code.UNAVAILABLE])
async def test_go_server_status_code_round_trip(go_server_socket: str, code: Code) -> None:
    with pytest.raises(StatusError) as exc:
        await call_go(go_server_socket, "Fail", f"{int(code)}:container abc: not found")
    assert (exc.value.code, exc.value.message) == (code, "container abc: not found")


async def test_go_server_unknown_method(go_server_socket: str) -> None:
    with pytest.raises(StatusError) as exc:
        await call_go(go_server_socket, "Nope", "")
    assert (exc.value.code, exc.value.message) == (Code.UNIMPLEMENTED, "method Nope")


async def test_metadata_reaches_go_server(go_server_socket: str) -> None:
    md = [("containerd-namespace-ttrpc", "k8s.io"), ("X-Multi", "a"), ("x-multi", "b")]
    assert await call_go(go_server_socket, "Metadata", "x-multi", metadata=md) == "a,b"
    assert await call_go(go_server_socket, "Metadata", "containerd-namespace-ttrpc", metadata=md) == "k8s.io"


async def test_client_timeout_against_go_server(go_server_socket: str) -> None:
    start = trio.current_time()
    with pytest.raises(StatusError) as exc:
        await call_go(go_server_socket, "Sleep", "10s", timeout=0.2)
    assert exc.value.code == Code.DEADLINE_EXCEEDED
    assert trio.current_time() - start < 5


@asynccontextmanager
async def raw_go_connection(socket: str) -> AsyncIterator[RawPeer]:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_unix_socket(socket)
        async with stream:
            yield RawPeer(stream)


async def test_go_server_honours_our_timeout_nano(go_server_socket: str) -> None:
    # no client-side timeout: the DEADLINE_EXCEEDED can only come from the Go server's context
    async with raw_go_connection(go_server_socket) as peer:
        await peer.send(request_frame(1, "Sleep", "10s", timeout_nano=200_000_000))
        sid, response = await peer.receive_response()
        assert (sid, response.code, response.message) == (1, Code.DEADLINE_EXCEEDED, "context deadline exceeded")


async def test_go_server_answers_oversized_frame_like_we_expect(go_server_socket: str) -> None:
    async with raw_go_connection(go_server_socket) as peer:
        await peer.send(b"\x00\x40\x00\x01" b"\x00\x00\x00\x03" b"\x01\x00" + b"\0" * (MAX_MESSAGE_LENGTH + 1))
        await peer.send(request_frame(5, "Echo", "after"))
        responses = await peer.receive_responses(2)
        assert (responses[3].code, responses[3].message) == (
            Code.RESOURCE_EXHAUSTED, "message length 4194305 exceed maximum message size of 4194304")
        assert value_of(responses[5]) == "after"


# --- Go client -> our server --------------------------------------------------------------------

@asynccontextmanager
async def python_server(path: Path) -> AsyncIterator[EchoService]:
    service = EchoService()
    server = Server()  # with the same-user check on: the Go client runs as us
    service.register(server)
    listener = listener_from_socket(bind_unix_socket(str(path)))
    async with listener, trio.open_nursery() as nursery:
        await nursery.start(server.serve, listener)
        yield service
        nursery.cancel_scope.cancel()


async def go_call(go_peer: Path, socket: Path, method: str, value: str = "", *args: str) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [str(go_peer), "call", "-socket", str(socket), "-method", method, "-value", value, *args],
            capture_stdout=True, capture_stderr=True)
    return json.loads(result.stdout)


async def test_go_client_echo(go_peer: Path, sock_dir: Path) -> None:
    async with python_server(sock_dir / "py.sock"):
        assert await go_call(go_peer, sock_dir / "py.sock", "Echo", "hello from go") == {
            "code": 0, "message": "", "value": "hello from go"}


async def test_go_client_unknown_method_and_service(go_peer: Path, sock_dir: Path) -> None:
    async with python_server(sock_dir / "py.sock"):
        got = await go_call(go_peer, sock_dir / "py.sock", "NoSuch")
        assert (got["code"], got["message"]) == (Code.UNIMPLEMENTED, "method NoSuch")
        got = await go_call(go_peer, sock_dir / "py.sock", "Echo", "", "-service", "no.such.Svc")
        assert (got["code"], got["message"]) == (Code.UNIMPLEMENTED, "service no.such.Svc")


@pytest.mark.parametrize("code", [Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION,
                                  Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED])
async def test_go_client_sees_our_status_codes(go_peer: Path, sock_dir: Path, code: Code) -> None:
    async with python_server(sock_dir / "py.sock"):
        got = await go_call(go_peer, sock_dir / "py.sock", "Fail", f"{int(code)}:container abc: not found")
        assert (got["code"], got["message"]) == (code, "container abc: not found")


async def test_go_client_sees_internal_for_handler_bug(go_peer: Path, sock_dir: Path) -> None:
    async with python_server(sock_dir / "py.sock"):
        got = await go_call(go_peer, sock_dir / "py.sock", "Boom")
        assert (got["code"], got["message"]) == (Code.INTERNAL, "RuntimeError: boom")
        assert (await go_call(go_peer, sock_dir / "py.sock", "Echo", "ok"))["value"] == "ok"


async def test_go_client_metadata(go_peer: Path, sock_dir: Path) -> None:
    async with python_server(sock_dir / "py.sock"):
        got = await go_call(go_peer, sock_dir / "py.sock", "Metadata", "x-key",
                            "-md", "X-Key=a", "-md", "x-key=b")
        assert got["value"] == "a,b"


async def test_go_client_deadline_reaches_our_handler(go_peer: Path, sock_dir: Path) -> None:
    async with python_server(sock_dir / "py.sock") as service:
        got = await go_call(go_peer, sock_dir / "py.sock", "Sleep", "10s", "-timeout", "300ms")
        assert got["code"] == Code.DEADLINE_EXCEEDED
        with trio.fail_after(5):
            await service.cancelled.wait()  # our handler was cancelled, not left running
