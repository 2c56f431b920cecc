"""The smallest HTTP/1.1 the metrics endpoints need: GET only, one request per connection.

Server: the request head is read within REQUEST_TIMEOUT_S and MAX_REQUEST_BYTES (a body is never
read: GET has none), the answer carries Content-Length and `Connection: close`, and at most
MAX_CONNECTIONS are served at once (more get 503 at once). Client: `get` over a unix socket, the
answer bounded in size and time. Request and response parsing are pure functions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
           500: "Internal Server Error"}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str], Awaitable[Response]]  # the request's path (query stripped) → the answer


class BadRequest(ValueError):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def parse_request(head: bytes) -> tuple[str, str]:
    """The method and path (without its query) of a request head ending in CRLF CRLF.
    Raises BadRequest."""
    try:
        line = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, _version = parts
    if not target.startswith("/"):
        raise BadRequest(400, "request target must be a path")
    return method, target.split("?", 1)[0]


def render_response(response: Response, *, head_only: bool = False) -> bytes:
    reason = REASONS.get(response.status, "Unknown")
    head = (f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + response.body


def text(status: int, message: str) -> Response:
    return Response(status, (message.rstrip("\n") + "\n").encode())


async def serve(listeners: list[trio.SocketListener], handler: Handler, *,
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `listeners` until cancelled."""
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(1):
                await _send(stream, render_response(text(503, "too many connections")))
            await stream.aclose()
            return
        try:
            await handle_connection(stream, handler)
        finally:
            limit.release()

    await trio.serve_listeners(connection, listeners, task_status=task_status)


async def handle_connection(stream: trio.SocketStream, handler: Handler) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S) as timer:
            try:
                head = await _read_head(stream)
                method, path = parse_request(head)
                if method not in ("GET", "HEAD"):
                    response = text(405, f"method {method} not allowed: GET only")
                else:
                    response = await handler(path)
            except BadRequest as exc:
                method, response = "GET", text(exc.status, str(exc))
            await _send(stream, render_response(response, head_only=method == "HEAD"))
        if timer.cancelled_caught:
            log.debug("metrics http: request timed out")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    finally:
        await stream.aclose()


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0 and len(data) <= MAX_REQUEST_BYTES:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise BadRequest(400, "connection closed before the request ended")
        data += chunk
    if end < 0 or end + 4 > MAX_REQUEST_BYTES:
        raise BadRequest(431, f"request head over {MAX_REQUEST_BYTES} bytes")
    return data[:end + 4]


async def _send(stream: trio.SocketStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# --- client ---------------------------------------------------------------------------------------
class HttpError(OSError):
    pass


def parse_response(data: bytes) -> tuple[int, bytes]:
    """Status and body of a whole HTTP/1.x answer (Content-Length honoured when given).
    Raises HttpError."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise HttpError("no complete response head")
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
        raise HttpError(f"malformed status line {lines[0][:80]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise HttpError("malformed Content-Length") from None
            if len(body) < length:
                raise HttpError(f"truncated body ({len(body)} of {length} bytes)")
            body = body[:length]
    return int(status_line[1]), body


async def get_unix(path: str, target: str, *, timeout: float, max_bytes: int) -> tuple[int, bytes]:
    """GET `target` from the HTTP server on unix socket `path`. Raises OSError (HttpError for a bad
    or oversized answer) and trio.TooSlowError."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                                  .encode("ascii"))
            chunks: list[bytes] = []
            size = 0
            while chunk := await stream.receive_some(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise HttpError(f"answer over {max_bytes} bytes")
                chunks.append(chunk)
    return parse_response(b"".join(chunks))
