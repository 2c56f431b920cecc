"""A process's stdio as the agent holds it: pipes (or one pty master) plus streaming readers.

Output is not buffered by the agent: the pipe is the buffer, so a slow host applies back-pressure to the
process and nothing written before exit is lost (readers drain the pipe until every writer has closed).
"""

import errno
import fcntl
import os
import select
import struct
import termios
import threading
from collections.abc import Callable, Iterator

from agent.errors import FailedPrecondition

_CHUNK = 64 * 1024
_POLL_MS = 200  # how often a blocked reader checks whether its RPC is still wanted


class OutputStream:
    """The agent's read end of a process's stdout or stderr (or of its pty master).

    One reader at a time; the fd is closed at EOF or by `close()`, whichever comes first.
    """

    def __init__(self, fd: int | None) -> None:
        # _lock guards _fd, _eof and _readers; the fd is only closed when no reader polls it.
        self._lock = threading.Lock()
        self._fd = fd
        self._eof = fd is None
        self._closing = False
        self._retired = False
        self._readers = 0

    def chunks(self, still_wanted: Callable[[], bool]) -> Iterator[bytes]:
        """Yield output until EOF (or until `still_wanted()` turns false, or `close()` is called).

        Raises FailedPrecondition if another reader is already attached.
        """
        with self._lock:
            if self._eof:
                return
            if self._readers:
                raise FailedPrecondition("output is already being read by another stream")
            self._readers += 1
            fd = self._fd
        assert fd is not None
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            while still_wanted() and not self._closing:
                if not poller.poll(_POLL_MS):
                    continue
                try:
                    data = os.read(fd, _CHUNK)
                except OSError as e:
                    if e.errno == errno.EIO:  # pty master once every slave fd is closed
                        data = b""
                    elif e.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    else:
                        raise
                if not data:
                    with self._lock:
                        self._eof = True
                    return
                yield data
        finally:
            with self._lock:
                self._readers -= 1
                if self._eof or self._closing or self._retired:
                    self._close_locked()

    def retire(self) -> None:
        """Close the fd once the current reader (if any) has finished; close it now if none reads."""
        with self._lock:
            self._retired = True
            if not self._readers:
                self._eof = True
                self._close_locked()

    def close(self) -> None:
        """Stop readers and close the fd (now, or when the current reader notices)."""
        with self._lock:
            self._closing = True
            self._eof = True
            if not self._readers:
                self._close_locked()

    def _close_locked(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None


class ProcessStdio:
    """The agent's ends of one process's stdio, and the child ends to hand to the runtime."""

    def __init__(self, terminal: bool, want_stdin: bool) -> None:
        self.terminal = terminal
        self._lock = threading.Lock()  # guards _stdin_fd (WriteStdin vs CloseStdin vs close)
        self._stdin_fd: int | None = None
        self._pty_fd: int | None = None
        self.child_fds: list[int] = []  # stdin, stdout, stderr for the runtime; closed after spawn
        self.stdout = OutputStream(None)
        self.stderr = OutputStream(None)
        if terminal:
            return  # the pty comes later from the runtime's console socket
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if want_stdin:
            r, w = os.pipe2(os.O_CLOEXEC)
            self._stdin_fd = w
            self.child_fds.append(r)
        else:
            self.child_fds.append(null)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        self.child_fds += [out_w, err_w]
        if want_stdin:
            os.close(null)
        self.stdout = OutputStream(out_r)
        self.stderr = OutputStream(err_r)

    def runtime_stdio(self) -> list[int]:
        """The fds to give the runtime as its stdin/stdout/stderr (/dev/null in terminal mode)."""
        if self.terminal:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.child_fds = [null, null, null]
        return self.child_fds

    def spawned(self, pty_master: int | None) -> None:
        """Called once the runtime has returned: drop the child ends, adopt the pty master if any."""
        for fd in set(self.child_fds):
            os.close(fd)
        self.child_fds = []
        if pty_master is not None:
            self._pty_fd = pty_master
            self._stdin_fd = pty_master
            # The master carries both directions; the output stream gets its own fd so that either
            # side can close without pulling the fd from under the other.
            self.stdout = OutputStream(os.dup(pty_master))

    def write_stdin(self, data: bytes) -> int:
        """Write all of `data` to the process's stdin. Raises FailedPrecondition if it is closed."""
        with self._lock:
            if self._stdin_fd is None:
                raise FailedPrecondition("stdin is closed or was not requested")
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._stdin_fd, view)
                except BrokenPipeError as e:
                    raise FailedPrecondition("the process closed its stdin") from e
                view = view[n:]
            return len(data)

    def close_stdin(self) -> None:
        """Signal EOF on stdin (pipe: close it; pty: send the EOF character, like Kata)."""
        with self._lock:
            if self._stdin_fd is None:
                return
            if self._pty_fd is not None:
                os.write(self._pty_fd, b"\x04")  # VEOF (^D) in canonical mode; the pty stays open
            else:
                os.close(self._stdin_fd)
            self._stdin_fd = None

    def resize(self, rows: int, columns: int) -> None:
        """Set the pty window size. Raises FailedPrecondition when the process has no terminal."""
        with self._lock:
            if self._pty_fd is None:
                raise FailedPrecondition("the process has no terminal")
            fcntl.ioctl(self._pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def retire(self) -> None:
        """The process was waited for: close stdin, let output readers finish, then close."""
        self.close_stdin_fd()
        self.stdout.retire()
        self.stderr.retire()

    def close_stdin_fd(self) -> None:
        with self._lock:
            if self._stdin_fd is not None and self._stdin_fd != self._pty_fd:
                os.close(self._stdin_fd)
            self._stdin_fd = None
            if self._pty_fd is not None:
                os.close(self._pty_fd)
                self._pty_fd = None

    def close(self) -> None:
        """Release every fd (output readers stop at their next poll)."""
        for fd in set(self.child_fds):
            os.close(fd)
        self.child_fds = []
        self.stdout.close()
        self.stderr.close()
        self.close_stdin_fd()
