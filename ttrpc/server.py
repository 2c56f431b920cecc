"""ttrpc server on trio: serves registered services concurrently over unix sockets.

One reader task per connection decodes frames; every request runs in its own task in the
connection's nursery (so a long `Wait` never blocks other calls), and responses go out under one send
lock, possibly out of order (the client matches them by stream id). Bad input never kills the server:
each problem is answered on its stream id when there is one, and a connection that breaks the framing
is closed alone.
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from .codec import (
    MAX_MESSAGE_LENGTH,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    Request,
    decode_request,
    encode_frame,
    encode_response,
)
from .errors import Code, RemoteProtocolError, StatusError
from .sockets import bind_unix_socket as bind_unix_socket  # re-exported

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)


@dataclass(frozen=True, slots=True)
class RequestContext:
    service: str
    method: str
    metadata: tuple[tuple[str, str], ...]
    deadline: float  # trio clock; inf when the caller set no timeout

    def get(self, key: str) -> str | None:
        """First metadata value for key (keys are lower-case on the wire)."""
        key = key.lower()
        return next((v for k, v in self.metadata if k == key), None)


@dataclass(frozen=True, slots=True)
class Method(Generic[Req]):
    """A unary method: how to decode its request and the coroutine that answers it."""

    request_type: type[Req]
    handler: Callable[[RequestContext, Req], Awaitable[Message]]


@dataclass
class _Connection:
    stream: trio.SocketStream
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    closed: bool = False

    async def send(self, stream_id: int, payload: bytes) -> None:
        frame = encode_frame(stream_id, MessageType.RESPONSE, payload)
        async with self.send_lock:
            if self.closed:
                return
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = True  # peer went away; nobody is left to answer


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a unix socket."""
    raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Server:
    """Holds the registered services and serves connections.

    `require_same_user` mirrors containerd's UnixSocketRequireSameUser: a peer whose euid/egid differ
    from ours is disconnected before it can send anything.
    """

    def __init__(self, *, require_same_user: bool = True) -> None:
        self._services: dict[str, dict[str, Method[Any]]] = {}
        self._require_same_user = require_same_user
        self.connections = 0  # open connections, for Shutdown decisions and tests
        self._no_connections = trio.Event()
        self._no_connections.set()

    async def wait_no_connections(self) -> None:
        """Return once no peer is connected (at once if none is)."""
        await self._no_connections.wait()

    def register(self, service: str, methods: Mapping[str, Method[Any]]) -> None:
        """Add a service. Raises ValueError if it is already registered."""
        if service in self._services:
            raise ValueError(f"service {service} already registered")
        self._services[service] = dict(methods)

    async def serve(self, listener: trio.SocketListener, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until cancelled; each is served in its own task."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self.handle_connection, stream)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        conn = _Connection(stream)
        if self._require_same_user and not self._same_user(stream):
            await stream.aclose()
            return
        self.connections += 1
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        decoder = FrameDecoder()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        if decoder.buffered:
                            log.warning("ttrpc: connection closed with %d bytes of a truncated frame",
                                        decoder.buffered)
                        break
                    decoder.feed(data)
                    for event in decoder.events():
                        self._dispatch_frame(nursery, conn, event)
                # peer is gone: its in-flight calls have nobody to answer (Go cancels their contexts)
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            self.connections -= 1
            if not self.connections:
                self._no_connections.set()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _same_user(self, stream: trio.SocketStream) -> bool:
        try:
            _, uid, gid = peer_credentials(stream.socket)
        except OSError as exc:
            log.warning("ttrpc: cannot read peer credentials: %s", exc)
            return False
        if (uid, gid) != (os.geteuid(), os.getegid()):
            log.warning("ttrpc: rejecting peer uid=%d gid=%d (not our user)", uid, gid)
            return False
        return True

    def _dispatch_frame(self, nursery: trio.Nursery, conn: _Connection,
                        event: Any) -> None:
        if isinstance(event, OversizedFrame):
            nursery.start_soon(conn.send, event.stream_id,
                               encode_response(Code.RESOURCE_EXHAUSTED, event.message))
            return
        if event.type != MessageType.REQUEST:
            return  # ttrpc 1.1 ignores anything that is not a request
        if event.stream_id % 2 == 0:
            nursery.start_soon(conn.send, event.stream_id, encode_response(
                Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"))
            return
        nursery.start_soon(self._handle_request, conn, event.stream_id, event.payload)

    async def _handle_request(self, conn: _Connection, stream_id: int, payload: bytes) -> None:
        try:
            request = decode_request(payload)
        except RemoteProtocolError as exc:
            await conn.send(stream_id, encode_response(Code.INVALID_ARGUMENT, str(exc)))
            return
        response = encode_response(*await self._call(request))
        # the limit applies to the whole envelope (encode_frame enforces it): checking only the reply
        # body let a reply just under 4 MiB raise LocalProtocolError here and take the server down
        if len(response) > MAX_MESSAGE_LENGTH:
            response = encode_response(
                Code.RESOURCE_EXHAUSTED,
                f"response of {len(response)} bytes exceeds maximum message size of {MAX_MESSAGE_LENGTH}")
        await conn.send(stream_id, response)

    async def _call(self, request: Request) -> tuple[int, str, bytes]:
        methods = self._services.get(request.service)
        if methods is None:
            return Code.UNIMPLEMENTED, f"service {request.service}", b""
        method = methods.get(request.method)
        if method is None:
            return Code.UNIMPLEMENTED, f"method {request.method}", b""
        try:
            message = method.request_type.FromString(request.payload)
        except DecodeError as exc:
            return Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}", b""
        # as Go's getRequestContext: 0 = no deadline; a negative value (the caller's deadline had
        # already passed when it sent) is a deadline in the past, not "no deadline"
        deadline = (trio.current_time() + request.timeout_nano / 1e9 if request.timeout_nano != 0
                    else float("inf"))
        ctx = RequestContext(request.service, request.method, request.metadata, deadline)
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                reply = await method.handler(ctx, message)
            if scope.cancelled_caught:
                return Code.DEADLINE_EXCEEDED, "context deadline exceeded", b""
            return Code.OK, "", reply.SerializeToString()
        except StatusError as exc:
            return int(exc.code), str(exc), b""
        except Exception as exc:  # a handler bug must not take the connection down
            log.exception("ttrpc: %s/%s failed", request.service, request.method)
            return Code.INTERNAL, f"{type(exc).__name__}: {exc}", b""


def listener_from_socket(sock: stdlib_socket.socket) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
