"""The one owner of waitpid(-1): reaps every child (and every orphan re-parented to the agent as PID 1
or subreaper) and routes exit statuses to whoever asked for that pid.

Nothing else in the agent may call waitpid/Popen.wait: a status taken by one waiter is lost to the
other. Helper commands are spawned with `Reaper.run`, container processes are followed with
`Reaper.on_exit`.
"""

import collections
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

# Statuses nobody has claimed yet (a process can exit before we learn its pid from a pid file).
# Orphans nobody will ever claim also land here, so the table is bounded.
_UNCLAIMED_LIMIT = 4096


def exit_code(status: int) -> int:
    """Turn a raw wait status into a shell-style code: the exit code, or 128+signal if killed."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


@dataclass(frozen=True)
class Completed:
    """Result of `Reaper.run`: shell-style exit code and captured output."""

    code: int
    stdout: bytes
    stderr: bytes


class Reaper:
    """Background thread reaping all children; call `start()` once, `stop()` at shutdown."""

    def __init__(self) -> None:
        # _lock guards _seq, _unclaimed and _callbacks.
        self._lock = threading.Lock()
        self._seq = 0
        self._unclaimed: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        self._callbacks: dict[int, tuple[int, Callable[[int], None]]] = {}
        self._children = threading.Event()  # set when there may be children to wait for
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._children.set()

    def mark(self) -> int:
        """Return a sequence number to pass to `on_exit` for a pid learned after this point.

        Statuses reaped before the mark are ignored for that pid, so a recycled pid never gets a
        stale status.
        """
        with self._lock:
            return self._seq

    def on_exit(self, pid: int, since: int, callback: Callable[[int], None]) -> None:
        """Call `callback(raw_status)` once `pid` has exited (at once if it already has since `since`).

        The callback runs in the reaper thread (or the caller's); it must be quick and not block.
        """
        with self._lock:
            seen = self._unclaimed.pop(pid, None)
            if seen is None or seen[0] <= since:
                self._callbacks[pid] = (since, callback)
                self._children.set()
                return
        callback(seen[1])

    def spawn(self, argv: list[str], **popen_kwargs: object) -> subprocess.Popen[bytes]:
        """Start `argv` with subprocess.Popen; its status must be collected via `on_exit`/`wait`.

        Raises OSError when the program cannot be executed.
        """
        proc = subprocess.Popen(argv, **popen_kwargs)  # type: ignore[call-overload]
        self._children.set()
        return proc

    def wait(self, proc: subprocess.Popen[bytes], since: int, timeout: float | None = None) -> int:
        """Block until `proc` exits and return its shell-style exit code.

        Raises TimeoutError when `timeout` seconds pass first.
        """
        done = threading.Event()
        result: list[int] = []

        def finished(status: int) -> None:
            result.append(status)
            done.set()

        self.on_exit(proc.pid, since, finished)
        if not done.wait(timeout):
            raise TimeoutError(f"pid {proc.pid} still running after {timeout}s")
        code = exit_code(result[0])
        # Tell Popen it is finished so it never calls waitpid itself (it would steal or get ECHILD).
        proc.returncode = code
        return code

    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 60.0,
            **popen_kwargs: object) -> Completed:
        """Run a helper command to completion, capturing stdout and stderr.

        Raises OSError if it cannot be started and TimeoutError (after killing it) if it overruns.
        """
        since = self.mark()
        proc = self.spawn(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kwargs)
        try:
            # communicate() only reads the pipes here: returncode is set by wait() below, never by
            # Popen polling, because we pass no timeout and check pipes only.
            out, err = _communicate(proc, input, timeout)
            code = self.wait(proc, since, timeout)
        except TimeoutError:
            proc.kill()
            self.wait(proc, since)
            raise
        return Completed(code, out, err)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No children right now: sleep until someone spawns one (orphans only appear as
                # descendants of our own children, so a periodic re-check covers the rest).
                self._children.clear()
                self._children.wait(0.5)
                continue
            except InterruptedError:
                continue
            self._deliver(pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        with self._lock:
            self._seq += 1
            waiter = self._callbacks.pop(pid, None)
            if waiter is None:
                self._unclaimed[pid] = (self._seq, status)
                while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                    self._unclaimed.popitem(last=False)
                return
        waiter[1](status)


def _communicate(proc: subprocess.Popen[bytes], input: bytes | None,
                 timeout: float | None) -> tuple[bytes, bytes]:
    """Write `input`, read stdout/stderr to EOF without ever calling waitpid.

    Raises TimeoutError if the pipes are still open after `timeout` seconds.
    """
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(stream: object, key: str) -> None:
        chunks[key].append(stream.read())  # type: ignore[attr-defined]

    readers = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True)]
    for r in readers:
        r.start()
    if proc.stdin is not None:
        try:
            if input:
                proc.stdin.write(input)
        except BrokenPipeError:
            pass  # the command exited without reading: its exit code tells the story
        finally:
            proc.stdin.close()
    for r in readers:
        r.join(timeout)
        if r.is_alive():
            raise TimeoutError(f"{proc.args!r} still running after {timeout}s")
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    return b"".join(chunks["out"]), b"".join(chunks["err"])
