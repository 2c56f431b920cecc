"""Where a start's time goes: phase timers logged as one structured `timing` line each.

Lines (parsed by benchmarks/):
  timing shim=<sandbox id> pid=<pid> start_cmd=<s> daemon_init=<s>
                                                       the `start` action until it spawned the daemon,
                                                       the daemon's own start-up until it serves
  timing sandbox=<id> <phase>=<s> ... total=<s>        VmSandbox.start(), phase by phase
  timing container=<id> rootfs=<s> ... total=<s>       create_container, phase by phase
  timing lifecycle=<id> create=<s> ... delete=<s>      one task from Create to Delete (LifecycleTimer)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("shim.timing")

# exported by `start` to the daemon it spawns: how long `start` had run by then
START_CMD_ENV = "KATA_PY_START_CMD_S"
# set by a spare daemon when it got its pod (CLOCK_BOOTTIME): shim/spare.py
ASSIGNED_ENV = "KATA_PY_ASSIGNED_AT"


class PhaseTimer:
    """Wall time of each named phase of a start, logged as one structured line."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.phases: dict[str, float] = {}
        self._t0 = self._last = time.monotonic()

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now

    def log(self, **extra: Any) -> None:
        total = round(time.monotonic() - self._t0, 3)
        fields = " ".join(f"{k}={v}" for k, v in {**self.phases, **extra, "total": total}.items())
        log.info("timing %s %s", self.what, fields)


class LifecycleTimer:
    """The moments of one task (a container's init or an exec), from its Create request on.

    Logged at Delete as the time between consecutive moments: create (the Create call, the sandbox's
    boot included for its first container), to_start (containerd's gap before Start), start (the Start
    call), first_output (Start returned → first stdout/stderr byte on the host), run (Start returned →
    exit recorded), to_delete (exit → Delete called), delete (the Delete call).
    """

    ORDER = ("created", "start_called", "started", "first_output", "exited", "delete_called", "deleted")

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.moments: dict[str, float] = {}

    def mark(self, moment: str) -> None:
        """Record `moment` once (the first output is marked by every chunk; the first one counts)."""
        self.moments.setdefault(moment, time.monotonic())

    def phases(self) -> dict[str, float]:
        m, out = self.moments, {}

        def span(name: str, start: float | None, end: str) -> None:
            if start is not None and end in m:
                out[name] = round(m[end] - start, 3)

        span("create", self.t0, "created")
        span("to_start", m.get("created"), "start_called")
        span("start", m.get("start_called"), "started")
        span("first_output", m.get("started"), "first_output")
        span("run", m.get("started"), "exited")
        span("to_delete", m.get("exited"), "delete_called")
        span("delete", m.get("delete_called"), "deleted")
        return out

    def log(self, what: str) -> None:
        fields = " ".join(f"{k}={v}" for k, v in self.phases().items())
        log.info("timing lifecycle=%s %s", what, fields)


def process_age_s(pid: int | str = "self") -> float:
    """Seconds since the process started (/proc/<pid>/stat starttime, in clock ticks since boot).
    0.0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after "comm)"
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def log_shim_start(sandbox_id: str) -> None:
    """The daemon serves: say how long `start` and the daemon's own start-up took."""
    start_cmd = os.environ.pop(START_CMD_ENV, "")
    assigned = os.environ.pop(ASSIGNED_ENV, "")  # a spare daemon (shim/spare.py): its start-up began then
    try:
        init = time.clock_gettime(time.CLOCK_BOOTTIME) - float(assigned) if assigned else process_age_s()
    except ValueError:
        init = 0.0
    fields = f"pid={os.getpid()} " + (f"start_cmd={start_cmd} " if start_cmd else "") + \
        f"daemon_init={init:.3f}" + (" spare=1" if assigned else "")
    log.info("timing shim=%s %s", sandbox_id, fields)
