"""One process the agent follows: a container's init or an exec'd process."""

import os
import threading
from collections.abc import Callable

from agent.errors import NotFound
from agent.reaper import Reaper, exit_code
from agent.stdio import ProcessStdio


class Process:
    """A running (or finished) process with its stdio and exit status."""

    def __init__(self, container_id: str, exec_id: str, stdio: ProcessStdio) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.status: int | None = None  # shell-style exit code once exited
        self._before_exit: Callable[[], None] | None = None
        self._exited = threading.Event()

    @property
    def label(self) -> str:
        what = f"exec {self.exec_id}" if self.exec_id else "init process"
        return f"{what} of container {self.container_id}"

    def follow(self, reaper: Reaper, pid: int, since: int, before_exit: Callable[[], None] | None = None) -> None:
        """Start tracking `pid` (learned from a pid file written after reaper mark `since`).
        `before_exit` runs (in the reaper's thread: quick, never raising) before the exit is told."""
        self.pid = pid
        self._before_exit = before_exit
        reaper.on_exit(pid, since, self._on_exit)

    def _on_exit(self, raw_status: int) -> None:
        if self._before_exit is not None:
            self._before_exit()
        self.status = exit_code(raw_status)
        self._exited.set()

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until exit; return the code (128+signal if killed), or None on timeout."""
        self._exited.wait(timeout)
        return self.status

    def signal(self, sig: int) -> None:
        """Send `sig` to the process. Raises NotFound once it has exited (like containerd)."""
        if self.exited or not self.pid:
            raise NotFound(f"{self.label}: process already finished")
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError as e:
            raise NotFound(f"{self.label}: process already finished") from e
