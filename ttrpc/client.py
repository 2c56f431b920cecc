"""ttrpc client on trio: one connection, concurrent unary calls matched by stream id."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from kata_trio import open_nursery_unwrapped

from .codec import (
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    Request,
    Response,
    decode_response,
    encode_frame,
    encode_request,
)
from .errors import ClosedError, Code, ProtocolError, RemoteProtocolError, StatusError

Resp = TypeVar("Resp", bound=Message)


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    response: Response | None = None
    error: Exception | None = None


class Client:
    """A ttrpc connection. Use `open_client()`; calls fail with ClosedError once it is gone."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._next_id = 1  # client streams are odd: 1, 3, 5, ...
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._closed: Exception | None = None
        self.closed_event = trio.Event()

    @property
    def is_closed(self) -> bool:
        return self._closed is not None

    async def call(self, service: str, method: str, request: Message, response_type: type[Resp], *,
                   timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()) -> Resp:
        """Send one unary request and wait for its response.

        Raises StatusError (non-OK status; DEADLINE_EXCEEDED when `timeout` passes first),
        ClosedError (connection gone), LocalProtocolError (request too large).
        """
        if self._closed is not None:
            raise ClosedError() from self._closed
        stream_id = self._next_id
        self._next_id += 2
        timeout_nano = 0 if timeout is None or math.isinf(timeout) else max(1, int(timeout * 1e9))
        frame = encode_frame(stream_id, MessageType.REQUEST, encode_request(Request(
            service, method, request.SerializeToString(), timeout_nano, tuple(metadata))))
        pending = self._pending[stream_id] = _Pending()
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                async with self._send_lock:
                    # a timeout that passed while we waited for the lock must not count as an
                    # interrupted send below (nothing was written yet)
                    await trio.lowlevel.checkpoint_if_cancelled()
                    try:
                        await self._stream.send_all(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        self._close(exc)
                        raise ClosedError() from exc
                    except trio.Cancelled:
                        # part of the frame may be out: the peer would read our next frame as the
                        # rest of this one, so the connection is unusable
                        await self._abort(ClosedError("ttrpc: closed: send interrupted"))
                        raise
                await pending.done.wait()
            if scope.cancelled_caught:
                raise StatusError("context deadline exceeded", Code.DEADLINE_EXCEEDED)
        finally:
            self._pending.pop(stream_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.response is not None
        if pending.response.code != Code.OK:
            raise StatusError(pending.response.message, pending.response.code)
        try:
            return response_type.FromString(pending.response.payload)
        except DecodeError as exc:
            raise RemoteProtocolError(f"ttrpc: error unmarshalling response payload: {exc}") from None

    async def receive_loop(self) -> None:
        """Read responses until the connection ends; then fail every pending call."""
        decoder = FrameDecoder()
        reason: Exception = ClosedError()
        try:
            while True:
                try:
                    data = await self._stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = ClosedError(f"ttrpc: closed: {exc}")
                    break
                if not data:
                    break
                decoder.feed(data)
                for event in decoder.events():
                    self._route(event)
        except ProtocolError as exc:
            reason = exc
        finally:
            self._close(reason)

    def _route(self, event: Frame | OversizedFrame) -> None:
        if isinstance(event, OversizedFrame):
            pending = self._pending.get(event.stream_id)
            if pending is not None:
                pending.error = StatusError(event.message, Code.RESOURCE_EXHAUSTED)
                pending.done.set()
            return
        if event.type != MessageType.RESPONSE:
            return
        pending = self._pending.get(event.stream_id)
        if pending is None:
            return  # a call that timed out already
        try:
            pending.response = decode_response(event.payload)
        except RemoteProtocolError as exc:
            pending.error = exc
        pending.done.set()

    def _close(self, reason: Exception) -> None:
        if self._closed is None:
            self._closed = reason
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = ClosedError(str(reason) or "ttrpc: closed")
                pending.done.set()
        self.closed_event.set()

    async def _abort(self, reason: Exception) -> None:
        self._close(reason)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        self._close(ClosedError())
        await self._stream.aclose()


@asynccontextmanager
async def open_client(path: str) -> AsyncIterator[Client]:
    """Connect to a ttrpc server on a unix socket path (a `unix://` prefix is accepted).

    Raises OSError if nothing listens there.
    """
    if path.startswith("unix://"):
        path = path[len("unix://"):]
    stream = await trio.open_unix_socket(path)
    async with open_client_on_stream(stream) as client:
        yield client


@asynccontextmanager
async def open_client_on_stream(stream: trio.abc.Stream) -> AsyncIterator[Client]:
    client = Client(stream)
    async with open_nursery_unwrapped() as nursery:  # the body's StatusError etc. come out bare
        nursery.start_soon(client.receive_loop)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
