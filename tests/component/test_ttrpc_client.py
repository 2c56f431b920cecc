"""ttrpc client: close, timeout, metadata and size rules.

Rules: every pending call fails with ClosedError when the connection goes away, and so does any later
call; a timeout fails the call with DEADLINE_EXCEEDED, is sent to the server as timeout_nano, and the
late response is dropped without disturbing other calls; metadata reaches the server handler; an
oversized request is refused locally (the connection survives); an oversized or undecodable response
fails only its own call; a send cut short by a timeout closes the connection instead of leaving a
half-written frame on it.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import StringValue

from tests.interop.ttrpc_support import SERVICE, EchoService, RawPeer
from ttrpc import (
    MAX_MESSAGE_LENGTH,
    ClosedError,
    Code,
    LocalProtocolError,
    MessageType,
    RemoteProtocolError,
    Server,
    StatusError,
    encode_frame,
    open_client_on_stream,
)
from ttrpc.client import Client
from ttrpc.codec import decode_request, encode_response

TIMEOUT = 10


async def echo(client: Client, value: str, **kwargs: object) -> str:
    reply = await client.call(SERVICE, "Echo", StringValue(value=value), StringValue, **kwargs)  # type: ignore[arg-type]
    return reply.value


def ok(value: str) -> bytes:
    return encode_response(Code.OK, "", StringValue(value=value).SerializeToString())


async def test_pending_calls_fail_when_server_goes_away() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    fake_server = RawPeer(server_stream)
    errors: list[BaseException] = []

    async def call_and_record() -> None:
        try:
            await echo(client, "x")
        except ClosedError as exc:
            errors.append(exc)

    with trio.fail_after(TIMEOUT):
        async with open_client_on_stream(client_stream) as client, trio.open_nursery() as nursery:
            nursery.start_soon(call_and_record)
            nursery.start_soon(call_and_record)
            await fake_server.receive_frame()
            await fake_server.receive_frame()  # both requests are on the wire, unanswered
            await server_stream.aclose()
            await client.closed_event.wait()
        assert len(errors) == 2
        assert client.is_closed
        with pytest.raises(ClosedError):
            await echo(client, "after close")


async def test_real_server_stopping_fails_pending_call() -> None:
    service = EchoService()
    server = Server(require_same_user=False)
    service.register(server)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server_scope = trio.CancelScope()

    async def stop_server() -> None:
        await service.started.wait()
        server_scope.cancel()

    with trio.fail_after(TIMEOUT):
        async with open_client_on_stream(client_stream) as client, trio.open_nursery() as nursery:
            nursery.start_soon(_serve_until_cancelled, server, server_stream, server_scope)
            nursery.start_soon(stop_server)
            with pytest.raises(ClosedError):
                await client.call(SERVICE, "Sleep", StringValue(value="3600"), StringValue)
        assert service.cancelled.is_set()


async def _serve_until_cancelled(server: Server, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
    with scope:
        await server.handle_connection(stream)  # type: ignore[arg-type]


async def test_timeout_is_deadline_exceeded_and_late_response_ignored(
        autojump_clock: trio.testing.MockClock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    fake_server = RawPeer(server_stream)
    with trio.fail_after(TIMEOUT):
        async with open_client_on_stream(client_stream) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_slow_then_fast_server, fake_server)
                with pytest.raises(StatusError) as exc:
                    await echo(client, "slow", timeout=1.5)
                assert (exc.value.code, exc.value.message) == (Code.DEADLINE_EXCEEDED,
                                                               "context deadline exceeded")
                assert trio.current_time() == pytest.approx(1.5)
                # the late answer to call 1 arrives before the answer to call 3 and must not be taken for it
                assert await echo(client, "fast") == "fast answer"
            assert not client.is_closed


async def _slow_then_fast_server(peer: RawPeer) -> None:
    first = await peer.receive_frame()
    request = decode_request(first.payload)
    assert request.timeout_nano == 1_500_000_000
    await trio.sleep(2)
    await peer.send(encode_frame(first.stream_id, MessageType.RESPONSE, ok("late answer")))
    second = await peer.receive_frame()
    assert second.stream_id == first.stream_id + 2
    assert decode_request(second.payload).timeout_nano == 0
    await peer.send(encode_frame(second.stream_id, MessageType.RESPONSE, ok("fast answer")))


async def test_metadata_reaches_the_server() -> None:
    server = Server(require_same_user=False)
    EchoService().register(server)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, server_stream)
            async with open_client_on_stream(client_stream) as client:
                md = [("containerd-namespace-ttrpc", "k8s.io"), ("x-multi", "a"), ("X-Multi", "b")]
                reply = await client.call(SERVICE, "Metadata", StringValue(value="x-multi"), StringValue,
                                          metadata=md)
                assert reply.value == "a,b"  # keys are case-insensitive, repeats keep their order
                reply = await client.call(SERVICE, "Metadata", StringValue(value="containerd-namespace-ttrpc"),
                                          StringValue, metadata=md)
                assert reply.value == "k8s.io"


async def test_oversized_request_refused_locally_connection_survives() -> None:
    server = Server(require_same_user=False)
    EchoService().register(server)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, server_stream)
            async with open_client_on_stream(client_stream) as client:
                with pytest.raises(LocalProtocolError):
                    await echo(client, "x" * MAX_MESSAGE_LENGTH)
                assert await echo(client, "small") == "small"


async def test_bad_responses_fail_only_their_call() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = RawPeer(server_stream)

    async def answer_badly() -> None:
        sids = [(await peer.receive_frame()).stream_id for _ in range(3)]
        await peer.send(b"\x00\x40\x00\x01" + sids[0].to_bytes(4, "big") + b"\x02\x00"
                        + b"\0" * (MAX_MESSAGE_LENGTH + 1))
        await peer.send(encode_frame(sids[1], MessageType.RESPONSE, b"\xff\xff"))
        await peer.send(encode_frame(99, MessageType.RESPONSE, ok("nobody asked")))
        await peer.send(encode_frame(sids[2], MessageType.DATA, ok("not a response")))
        await peer.send(encode_frame(sids[2], MessageType.RESPONSE, ok("fine")))

    async def expect(exc_type: type[Exception], code: Code | None = None) -> None:
        with pytest.raises(exc_type) as exc:
            await echo(client, "x")
        if code is not None:
            assert exc.value.code == code  # type: ignore[attr-defined]

    with trio.fail_after(TIMEOUT):
        async with open_client_on_stream(client_stream) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_badly)
                nursery.start_soon(expect, StatusError, Code.RESOURCE_EXHAUSTED)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(expect, RemoteProtocolError)
                await trio.testing.wait_all_tasks_blocked()
                assert await echo(client, "x") == "fine"
            assert not client.is_closed


async def test_timeout_during_send_closes_instead_of_corrupting() -> None:
    # lockstep: send_all blocks until the peer reads, so the timeout can hit mid-frame
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    with trio.fail_after(TIMEOUT):
        async with open_client_on_stream(client_stream) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_stream.receive_some, 4)  # takes 4 bytes of the header only
                with pytest.raises(StatusError) as exc:
                    await echo(client, "y" * 1000, timeout=0.05)
                assert exc.value.code == Code.DEADLINE_EXCEEDED
            assert client.is_closed  # the peer is mid-frame: no later frame could be read correctly
            with pytest.raises(ClosedError):
                await echo(client, "next")



async def test_timeout_while_waiting_to_send_keeps_the_connection() -> None:
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    peer = RawPeer(server_stream)
    with trio.fail_after(TIMEOUT):
        async with open_client_on_stream(client_stream) as client, trio.open_nursery() as nursery:
            # call 1 holds the send lock (nobody reads yet); call 2 times out waiting behind it
            nursery.start_soon(echo, client, "first")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(StatusError):
                await echo(client, "second", timeout=0.05)
            assert not client.is_closed
            frame = await peer.receive_frame()
            await peer.send(encode_frame(frame.stream_id, MessageType.RESPONSE, ok("first")))


async def test_an_error_in_the_client_body_comes_out_bare() -> None:
    # callers catch ttrpc errors around `async with open_client(...)` (the event publisher does):
    # the client's nursery must not turn them into a group of one (trio >= 0.25 nurseries would)
    client_stream, _ = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT), pytest.raises(StatusError, match="refused"):
        async with open_client_on_stream(client_stream):
            raise StatusError("refused", Code.PERMISSION_DENIED)
