"""Small helpers the VM end-to-end tests share: find a containerd's QEMUs, wait for a condition."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .containerd import PrivateContainerd

T = TypeVar("T")


def qemus_under(path: Path | str) -> list[int]:
    """QEMU processes whose command line names something under `path` (their state dir)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(path).encode() in cmd:
            pids.append(int(pid))
    return pids


def qemu_pids(ctd: PrivateContainerd) -> list[int]:
    """QEMU processes of this containerd's sandboxes."""
    return qemus_under(ctd.kata_state)


def wait_for(predicate: Callable[[], T], timeout: float = 60, what: str = "condition") -> T:
    """Poll until predicate() is truthy and return its value; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
