"""Where template VMs are built, and the reaping of builds whose builder died (stdlib and
vmm.procrecord only: the `delete` action runs it, and containerd waits for that)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from vmm.procrecord import QEMU_RECORD, kill_recorded

from ..layout import builds_dir


def build_work_dir(state_root: str | Path, key: str) -> Path:
    """Where this process boots the template VM for `key` (sockets, console): named by our pid, so
    that reap_orphan_builds can tell a live builder's VM from one a killed shim left behind."""
    return builds_dir(state_root) / str(os.getpid()) / key[:8]


@contextlib.contextmanager
def build_dir(state_root: str | Path, key: str) -> Iterator[Path]:
    """build_work_dir for the duration of a build; then our pid's directory goes too, if empty (the
    build removes its own work dir)."""
    work_dir = build_work_dir(state_root, key)
    try:
        yield work_dir
    finally:
        with contextlib.suppress(OSError):
            work_dir.parent.rmdir()


def reap_orphan_builds(state_root: str | Path) -> list[int]:
    """Kill the template VMs of builders that died (SIGKILLed shims) and remove their directories;
    return the QEMU pids killed. A VM is killed only while it still is the process its build
    directory records (vmm/procrecord.py: pid + start time + boot id, checked through a pidfd), never
    a process that merely reuses the pid."""
    killed: list[int] = []
    root = builds_dir(state_root)
    try:
        owners = [d for d in root.iterdir() if d.name.isdigit()]
    except OSError:
        return killed
    for owner in owners:
        if Path(f"/proc/{owner.name}").exists():
            continue  # the builder lives (it cleans up after itself)
        for record in owner.glob(f"*/{QEMU_RECORD}"):
            try:
                pid = kill_recorded(record)
            except (OSError, ValueError):
                continue
            if pid is not None:
                killed.append(pid)
        shutil.rmtree(owner, ignore_errors=True)
    return killed
