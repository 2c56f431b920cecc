"""Template build directories of dead builders are reaped (their VMs killed), live ones left alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from shim.factory.builds import build_work_dir, reap_orphan_builds
from shim.layout import BUILDS_DIR
from vmm.procrecord import QEMU_RECORD, ProcRecord, format_record, write_record


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _fake_vm(work_dir: Path, same_process: bool = True) -> subprocess.Popen[bytes]:
    """A process standing in for the build's QEMU, recorded in its work dir as QemuHypervisor records
    it; `same_process=False`: the record names its pid but another start time (the pid was reused)."""
    work_dir.mkdir(parents=True)
    proc = subprocess.Popen(["sleep", "60"])
    record = write_record(work_dir / QEMU_RECORD, proc.pid)
    if not same_process:
        stale = ProcRecord(record.pid, record.start_ticks - 1, record.boot_id)
        (work_dir / QEMU_RECORD).write_text(format_record(stale))
    return proc


def test_orphaned_build_vm_is_killed_and_its_dir_removed(tmp_path: Path):
    orphan = _fake_vm(tmp_path / BUILDS_DIR / str(_dead_pid()) / "abcdef0123456789")
    unrelated = _fake_vm(tmp_path / BUILDS_DIR / str(_dead_pid()) / "0123456789abcdef", same_process=False)
    live_work = build_work_dir(tmp_path, "fedcba9876543210ffff")  # ours: this process lives
    live = _fake_vm(live_work)
    try:
        killed = reap_orphan_builds(tmp_path)
        assert killed == [orphan.pid]
        assert orphan.wait(5) != 0
        assert unrelated.poll() is None, "a pid that is not the build's VM (reused) was killed"
        assert live.poll() is None and live_work.is_dir()
        assert sorted(p.name for p in (tmp_path / BUILDS_DIR).iterdir()) == [str(os.getpid())]
    finally:
        for proc in (orphan, unrelated, live):
            proc.kill()
            proc.wait()


def test_nothing_to_reap(tmp_path: Path):
    assert reap_orphan_builds(tmp_path) == []
