"""Host side of a process's stdio: containerd's fifos, file:// logs or a binary:// logger, and the
pumps to the agent.

Everything is opened during Create/Exec, before we reply, so output written right after Start is never
lost. stdout/stderr fifos are opened O_RDWR: a handle that never sees ENXIO/EPIPE while containerd's
reader is away. stdin is a reader plus a keep-alive writer: without the writer the reader would see EOF
whenever containerd's own writer is absent; CloseIO closes the keep-alive, so EOF arrives once
containerd's writer is closed too (protocols.md §5). A binary:// logger (shim/binlog.py) gets the
read ends of two pipes whose write ends stand where the fifos would; the pump that closes the last of
them waits for the logger to exit, before the process's exit is reported.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .binlog import LoggerProcess
from .errors import InvalidArgument
from .stdio_uri import Fifo, LogFile, Logger, Target, parse_outputs

log = logging.getLogger(__name__)
CHUNK = 32 * 1024


def _open_output(target: Target | None) -> int | None:
    """Open a fifo or file:// target; raises OSError, InvalidArgument."""
    if target is None:
        return None
    if isinstance(target, LogFile):
        os.makedirs(os.path.dirname(target.path) or "/", mode=0o755, exist_ok=True)
        return os.open(target.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    assert isinstance(target, Fifo)
    try:
        is_fifo = stat.S_ISFIFO(os.stat(target.path).st_mode)
    except FileNotFoundError:
        raise InvalidArgument(f"stdio path {target.path} does not exist") from None
    flags = (os.O_RDWR | os.O_NONBLOCK) if is_fifo else (os.O_WRONLY | os.O_APPEND)
    return os.open(target.path, flags | os.O_CLOEXEC)


@dataclass
class HostStdio:
    """Open host-side ends of one process's stdio. Close with `close()` (idempotent)."""

    terminal: bool
    stdin_reader: int | None = None
    stdin_keepalive: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    logger: LoggerProcess | None = None  # binary://: ended by the pumps (or close())
    _streams: list[trio.lowlevel.FdStream] = field(default_factory=list)

    @classmethod
    async def open(cls, stdin: str, stdout: str, stderr: str, terminal: bool, *, process_id: str = "",
                   namespace: str = "") -> HostStdio:
        """Open the host ends; a binary:// stdout starts its logger (named CONTAINER_ID=`process_id`,
        the container's or the exec's id as the runc shim does, in `namespace`) and waits until it is
        ready. Raises InvalidArgument for unsupported URIs or missing paths, DeadlineExceeded or
        Unavailable for a logger that does not get ready."""
        out, err = parse_outputs(stdout, stderr)
        if stdin and not stdin.startswith("/"):
            raise InvalidArgument(f"stdin {stdin!r}: the path must be absolute")
        io = cls(terminal)
        try:
            if stdin:
                io.stdin_reader = os.open(stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                io.stdin_keepalive = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            if isinstance(out, Logger):
                io.logger, io.stdout, io.stderr = await LoggerProcess.start(
                    out, process_id=process_id, namespace=namespace)
                if terminal:  # the pty merges both streams onto stdout: the logger's fd 4 sees EOF now
                    io.close_output("stderr")
            else:
                io.stdout = _open_output(out)
                # with a terminal the pty merges both streams onto stdout; nothing goes to stderr
                io.stderr = None if terminal else _open_output(err)
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
        """Close every fd; a logger still here (its process never ran: no pump took it) is killed."""
        for name in ("stdin_reader", "stdin_keepalive", "stdout", "stderr"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        logger, self.logger = self.logger, None
        if logger is not None:
            logger.kill()

    async def outputs_done(self) -> None:
        """After a pump closed its output: once both are closed, the logger (if any) gets EOF on both
        pipes; wait for it to exit (bounded; it is killed otherwise)."""
        if self.stdout is None and self.stderr is None and self.logger is not None:
            logger, self.logger = self.logger, None
            await logger.stop()

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
        await io.outputs_done()
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
