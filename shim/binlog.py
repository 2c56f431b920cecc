"""A binary:// logging process, started and ended as containerd's runc shim does (NewBinaryIO).

The contract (containerd's runtime/v2/logging): the logger runs with only CONTAINER_ID and
CONTAINER_NAMESPACE in its environment, stdin/stdout/stderr on /dev/null, fd 3 = the process's
stdout (read end of a pipe), fd 4 = its stderr, fd 5 = a "ready" pipe it closes (or writes a byte
to, which binary-v2 requires) once it is ready. We wait for ready (bounded: runc waits forever)
before Create/Exec answers. When the process's output ends, the shim closes the write ends; the
logger sees EOF on both, writes out what it holds and exits; we wait for that (bounded), then
SIGTERM, then SIGKILL, and always reap it: the logger is ours from spawn to reaping.

posix_spawn, not fork: the shim has threads (gRPC), and the fds must land on exactly 3, 4 and 5.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
from dataclasses import dataclass

import trio

from .errors import DeadlineExceeded, InvalidArgument, Unavailable
from .stdio_uri import Logger

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
EXIT_GRACE_S = 5.0  # after EOF on both pipes: time to flush and exit
TERM_GRACE_S = 2.0  # after SIGTERM
EXITED_CHECK_S = 0.02  # its ready pipe closes as it exits, a moment before its pidfd says so
_HIGH_FD = 10  # sources of the child's dup2s live above 5, so no dup2 clobbers a later source


def check_binary(path: str) -> None:
    """Raises InvalidArgument unless `path` is an executable regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InvalidArgument(f"logging binary {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"logging binary {path}: not a regular file")
    if not os.access(path, os.X_OK):
        raise InvalidArgument(f"logging binary {path}: not executable")


@dataclass(eq=False)
class LoggerProcess:
    """A running logger; `stop()` (async, graceful) or `kill()` (sync) ends and reaps it, once."""

    path: str
    pid: int
    _pidfd: int | None

    @classmethod
    async def start(cls, target: Logger, *, process_id: str, namespace: str,
                    ready_timeout: float = READY_TIMEOUT_S) -> tuple[LoggerProcess, int, int]:
        """Spawn the logger and wait until it is ready; return it with the write ends of its stdout
        and stderr pipes (O_CLOEXEC, ours to close). Raises InvalidArgument (not startable),
        DeadlineExceeded (not ready in time), Unavailable (it exited before it was ready)."""
        if not process_id or not namespace:
            raise InvalidArgument("binary log URI: the process id and namespace are required")
        check_binary(target.path)
        fds: list[int] = []  # everything here is closed on the way out, except what we return
        try:
            out_r, out_w = _pipe(fds)
            err_r, err_w = _pipe(fds)
            ready_r, ready_w = _pipe(fds)
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            fds.append(null)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD) for fd in (null, out_r, err_r, ready_w)]
            fds += high
            h_null, h_out, h_err, h_ready = high
            actions: list[tuple[int, ...]] = [  # DUP2 (op, fd, target), CLOSE (op, fd)
                (os.POSIX_SPAWN_DUP2, h_null, 0), (os.POSIX_SPAWN_DUP2, h_null, 1),
                (os.POSIX_SPAWN_DUP2, h_null, 2), (os.POSIX_SPAWN_DUP2, h_out, 3),
                (os.POSIX_SPAWN_DUP2, h_err, 4), (os.POSIX_SPAWN_DUP2, h_ready, 5)]
            # fds the shim inherited without O_CLOEXEC would be the logger's too (ours all have it)
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 5]
            env = {"CONTAINER_ID": process_id, "CONTAINER_NAMESPACE": namespace}
            try:
                # SIGPIPE is ignored in Python, and an ignored signal stays ignored across exec.
                # posix_spawn returns once the child exec'd (vfork): nothing here waits for the logger
                pid = os.posix_spawn(target.path, target.argv, env, file_actions=actions,  # noqa: ASYNC221
                                     setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
            except OSError as exc:
                raise InvalidArgument(f"cannot start logging binary {target.path}: {exc.strerror}") from None
            proc = cls(target.path, pid, os.pidfd_open(pid))
            log.info("logger %s started (pid %d) for %s", target.path, pid, process_id)
            for fd in (out_r, err_r, ready_w, *high, null):  # the child has its copies
                os.close(fd)
                fds.remove(fd)
            try:
                await proc._wait_ready(ready_r, target, ready_timeout)
            except BaseException:
                proc.kill()
                raise
            fds.remove(out_w)
            fds.remove(err_w)
            return proc, out_w, err_w
        finally:
            for fd in fds:
                os.close(fd)

    async def _wait_ready(self, ready_r: int, target: Logger, timeout: float) -> None:
        os.set_blocking(ready_r, False)
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(ready_r)
            data = os.read(ready_r, 1)
            if not data:  # closed: ready (binary), unless it closed it by exiting
                with trio.move_on_after(EXITED_CHECK_S):
                    if self._pidfd is not None:
                        await trio.lowlevel.wait_readable(self._pidfd)
            if not data and self._exited():
                raise Unavailable(f"logging binary {target.path} exited before it was ready")
            if not data and target.strict_ready:
                raise Unavailable(f"logging binary {target.path} closed its ready pipe without a byte"
                                  " (binary-v2)")
            return
        raise DeadlineExceeded(f"logging binary {target.path} was not ready within {timeout:g} s")

    def _exited(self) -> bool:
        """Has it exited (without reaping it)?"""
        if self._pidfd is None:
            return True
        info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is not None

    def _reap(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is None:
            return
        try:
            _, status = os.waitpid(self.pid, 0)
            log.info("logger %s (pid %d) exited: %s", self.path, self.pid, _describe(status))
        except ChildProcessError:
            pass
        finally:
            os.close(fd)

    def _signal(self, sig: int) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL and reap, now (for a logger whose process never ran: nothing to flush)."""
        if self._pidfd is not None:
            self._signal(signal.SIGKILL)
            self._reap()

    async def stop(self, grace: float = EXIT_GRACE_S, term_grace: float = TERM_GRACE_S) -> None:
        """Once its pipes are closed: let it exit within `grace`, then SIGTERM, then SIGKILL; reap.
        Shielded: a cancelled owner still never leaves the logger behind."""
        fd = self._pidfd
        if fd is None:
            return
        with trio.CancelScope(shield=True):
            for sig, wait in ((0, grace), (signal.SIGTERM, term_grace)):
                if sig:
                    log.warning("logger %s (pid %d) still running: signal %d", self.path, self.pid, sig)
                    self._signal(sig)
                with trio.move_on_after(wait):
                    await trio.lowlevel.wait_readable(fd)  # a pidfd is readable once its process exited
                    break
            else:
                log.warning("logger %s (pid %d) ignored SIGTERM: SIGKILL", self.path, self.pid)
                self._signal(signal.SIGKILL)
                await trio.lowlevel.wait_readable(fd)
            self._reap()


def _inheritable_fds() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                found.append(int(name))
        except OSError:  # the directory listdir had open
            pass
    return found


def _pipe(fds: list[int]) -> tuple[int, int]:
    r, w = os.pipe()
    fds += [r, w]
    return r, w


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"
