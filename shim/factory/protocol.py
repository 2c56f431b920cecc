"""The pool's wire protocol: one JSON object per line over its unix socket, one request per connection.

Request `{"op": "take", "key": <template key>, "state_dir": <the sandbox's state dir>}`; reply
`{"ok": true, "pid": <QEMU pid>}` once the VM's files (qmp.sock, agent.sock, console.log, qemu.pid,
shared/) have been moved into state_dir and the pool has let go of it, or `{"ok": false, "reason": ...}`.
`{"op": "spare"}` answers `{"ok": true, "socket": <a spare shim daemon's socket>}` (shim/spare.py).
`{"op": "status"}` answers `{"ok": true, "ready": {key: count}, "size": N, "shims": <spares ready>}`.
"""

from __future__ import annotations

import json
from typing import Any

import trio

MAX_MESSAGE = 64 * 1024  # requests and replies are tiny: anything longer is not ours


class PoolError(Exception):
    """The pool could not be reached or answered nonsense (the caller falls back)."""


async def send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")


async def receive(stream: trio.SocketStream) -> dict[str, Any]:
    """One line-delimited JSON object. Raises PoolError on EOF, overlong or malformed input."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(MAX_MESSAGE)
        if not chunk:
            raise PoolError("connection closed mid-message")
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            raise PoolError("message too long")
    try:
        message = json.loads(buf)
    except ValueError as exc:
        raise PoolError(f"malformed message: {exc}") from exc
    if not isinstance(message, dict):
        raise PoolError("message is not an object")
    return message


async def request(socket_path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request, return the reply. Raises PoolError (also on timeout)."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(socket_path)
            async with stream:
                await send(stream, message)
                return await receive(stream)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        raise PoolError(f"pool at {socket_path}: {type(exc).__name__}: {exc}") from exc
