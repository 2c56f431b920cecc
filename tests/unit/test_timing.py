"""shim/timing.py: phase arithmetic and the structured lines the benchmarks parse."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from shim import timing
from shim.timing import LifecycleTimer, PhaseTimer


def test_lifecycle_phases_are_the_gaps_between_moments(monkeypatch: pytest.MonkeyPatch):
    clock = iter([10.0, 10.5, 10.6, 10.9, 11.0, 11.2, 11.3, 11.35])
    monkeypatch.setattr(timing.time, "monotonic", lambda: next(clock))
    timer = LifecycleTimer()  # t0 = 10.0
    for moment in ("created", "start_called", "started", "first_output", "exited", "delete_called", "deleted"):
        timer.mark(moment)
    assert timer.phases() == {"create": 0.5, "to_start": 0.1, "start": 0.3, "first_output": 0.1,
                              "run": 0.3, "to_delete": 0.1, "delete": 0.05}


def test_lifecycle_keeps_the_first_mark_and_leaves_out_what_never_happened():
    timer = LifecycleTimer()
    timer.mark("created")
    first = timer.moments["created"]
    time.sleep(0.01)
    timer.mark("created")
    assert timer.moments["created"] == first
    assert set(timer.phases()) == {"create"}  # never started, no output, never deleted


def test_lines_are_structured(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="shim.timing")
    timer = PhaseTimer("sandbox=s1")
    timer.mark("vm_restore")
    timer.log(boot="template")
    life = LifecycleTimer()
    life.mark("created")
    life.log("c1")
    assert caplog.messages[0].startswith("timing sandbox=s1 vm_restore=")
    assert "boot=template total=" in caplog.messages[0]
    assert caplog.messages[1].startswith("timing lifecycle=c1 create=")


def test_process_age_counts_from_the_process_start():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.3)
        assert 0.2 <= timing.process_age_s(child.pid) < 2.0
    finally:
        child.kill()
        child.wait()
    assert timing.process_age_s(os.getpid()) > 0
    assert timing.process_age_s(2**22 + 12345) == 0.0  # no such process
