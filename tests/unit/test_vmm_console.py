"""The console log stays bounded while QEMU appends to it, and its tail is never touched (#14)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmm.console import ConsoleBound, hole_to_punch

KiB = 1024


def test_hole_arithmetic():
    assert hole_to_punch(100 * KiB, 0, 1024 * KiB) is None  # under the bound
    assert hole_to_punch(1024 * KiB + 4095, 0, 1024 * KiB) is None  # less than a page over
    assert hole_to_punch(1030 * KiB, 0, 1024 * KiB) == (0, 4 * KiB)  # whole pages only
    assert hole_to_punch(3000 * KiB, 4 * KiB, 1024 * KiB) == (4 * KiB, 1972 * KiB)  # from where it stopped
    assert hole_to_punch(3000 * KiB, 1976 * KiB, 1024 * KiB) is None


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_an_appended_log_is_freed_at_its_head_and_keeps_its_tail(tmp_path: Path, where: str):
    base = tmp_path if where == "tmp_path" else Path(where)
    path = base / f"console-{os.getpid()}.log"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as QEMU's chardev opens it
        bound = ConsoleBound(path, keep=64 * KiB)
        written = b""
        for i in range(40):  # a guest that never stops writing
            chunk = (f"line {i:04d} ".encode() * 2000)[:50 * KiB]
            os.write(fd, chunk)
            written += chunk
            bound.check()
        os.close(fd)
        st = os.stat(path)
        assert st.st_size == len(written)  # the file keeps its length: readers seek from the end
        if not bound.supported:
            pytest.skip(f"{base}'s filesystem cannot punch holes")
        assert st.st_blocks * 512 <= 64 * KiB + 50 * KiB + 8 * KiB, st  # what stays allocated is bounded
        data = path.read_bytes()
        assert data[-64 * KiB:] == written[-64 * KiB:]  # the tail, byte for byte
        assert data[:bound.freed_to] == b"\0" * bound.freed_to  # only the head is gone
        assert data[bound.freed_to:] == written[bound.freed_to:]
    finally:
        path.unlink(missing_ok=True)


def test_a_missing_or_symlinked_log_is_left_alone(tmp_path: Path):
    assert ConsoleBound(tmp_path / "none.log").check() == 0
    target = tmp_path / "precious"
    target.write_bytes(b"x" * (3 << 20))
    (tmp_path / "link.log").symlink_to(target)
    assert ConsoleBound(tmp_path / "link.log", keep=4096).check() == 0  # O_NOFOLLOW: never through a link
    assert target.read_bytes() == b"x" * (3 << 20)
