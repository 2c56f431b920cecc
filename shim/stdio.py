"""Host side of a process's stdio: containerd's fifos (or file:// URIs) and the pumps to the agent.

Everything is opened during Create/Exec, before we reply, so output written right after Start is never
lost. stdout/stderr fifos are opened O_RDWR: a handle that never sees ENXIO/EPIPE while containerd's
reader is away. stdin is a reader plus a keep-alive writer: without the writer the reader would see EOF
whenever containerd's own writer is absent; CloseIO closes the keep-alive, so EOF arrives once
containerd's writer is closed too (protocols.md §5).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import trio

from .errors import InvalidArgument

log = logging.getLogger(__name__)
CHUNK = 32 * 1024


def _open_output(uri: str) -> int | None:
    if not uri:
        return None
    parsed = urlparse(uri)
    scheme = parsed.scheme or "fifo"
    if scheme == "file":
        path = parsed.path
        os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if scheme != "fifo":
        raise InvalidArgument(f"unknown STDIO scheme {scheme}")
    path = parsed.path if parsed.scheme else uri
    try:
        is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        raise InvalidArgument(f"stdio path {path} does not exist") from None
    flags = (os.O_RDWR | os.O_NONBLOCK) if is_fifo else (os.O_WRONLY | os.O_APPEND)
    return os.open(path, flags | os.O_CLOEXEC)


@dataclass
class HostStdio:
    """Open host-side ends of one process's stdio. Close with `close()` (idempotent)."""

    terminal: bool
    stdin_reader: int | None = None
    stdin_keepalive: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    _streams: list[trio.lowlevel.FdStream] = field(default_factory=list)

    @classmethod
    def open(cls, stdin: str, stdout: str, stderr: str, terminal: bool) -> HostStdio:
        """Raises InvalidArgument for unsupported URIs or missing paths."""
        io = cls(terminal)
        try:
            if stdin:
                io.stdin_reader = os.open(stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                io.stdin_keepalive = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            io.stdout = _open_output(stdout)
            # with a terminal the pty merges both streams onto stdout; nothing goes to stderr
            io.stderr = None if terminal else _open_output(stderr)
        except OSError as exc:
            io.close()
            raise InvalidArgument(f"cannot open stdio: {exc}") from None
        except BaseException:
            io.close()
            raise
        return io

    @property
    def has_stdin(self) -> bool:
        return self.stdin_reader is not None

    def close_stdin(self) -> None:
        """CloseIO(stdin): drop our keep-alive writer so the reader sees EOF after containerd's."""
        fd, self.stdin_keepalive = self.stdin_keepalive, None
        if fd is not None:
            os.close(fd)

    def close_output(self, which: str) -> None:
        """Our O_RDWR handle counts as a writer: drop it at the end of the stream, so the reader sees
        EOF (CRI's ExecSync waits for that before it asks for the exit)."""
        fd = getattr(self, which)
        setattr(self, which, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for name in ("stdin_reader", "stdin_keepalive", "stdout", "stderr"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _stream(self, name: str) -> trio.lowlevel.FdStream | None:
        fd = getattr(self, name)
        if fd is None:
            return None
        # FdStream owns a dup: our fd stays valid for close() whatever the pump does
        stream = trio.lowlevel.FdStream(os.dup(fd))
        self._streams.append(stream)
        return stream


async def pump_output(source: AsyncIterator[bytes], io: HostStdio, which: str,
                      on_chunk: Callable[[], None] | None = None) -> int:
    """Copy a process's output stream to its host fd until EOF; return bytes copied. `on_chunk` is
    called as each chunk arrives (telemetry).

    Without a host fd the output is still drained (the guest pipe must not fill up).
    """
    stream = io._stream(which)
    copied = 0
    try:
        async for chunk in source:
            if on_chunk is not None:
                on_chunk()
            copied += len(chunk)
            if stream is not None:
                try:
                    await stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    log.warning("%s: host side gone (%s); discarding the rest", which, exc)
                    stream = None
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        io.close_output(which)
    return copied


async def pump_stdin(io: HostStdio, write: Callable[[bytes], Awaitable[int]],
                     close: Callable[[], Awaitable[None]]) -> None:
    """Copy the stdin fifo to the process until EOF, then close the process's stdin."""
    stream = io._stream("stdin_reader")
    if stream is None:
        return
    try:
        while True:
            try:
                data = await stream.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                log.debug("stdin: EOF")
                break
            view = memoryview(data)
            while view:
                n = await write(bytes(view))
                if n <= 0 or n > len(view):
                    raise OSError(f"agent accepted {n} of {len(view)} stdin bytes")
                view = view[n:]
        await close()
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
