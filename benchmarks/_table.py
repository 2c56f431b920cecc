"""Shared bits of the VM benchmarks: plain-text tables, median/min/max, the VM lock, /proc readers."""

from __future__ import annotations

import fcntl
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

VM_LOCK = "/tmp/kata-py-vm.lock"
MIB = 1 << 20


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def stats_row(name: str, values: Sequence[float | None]) -> list[object]:
    """[name, median, min, max, n] over the values that were measured (None = not seen)."""
    seen = [v for v in values if v is not None]
    if not seen:
        return [name, None, None, None, 0]
    return [name, statistics.median(seen), min(seen), max(seen), len(seen)]


STATS_HEADERS = ("", "median", "min", "max", "n")


@contextmanager
def vm_lock(path: str = VM_LOCK) -> Iterator[None]:
    """Hold the machine-wide lock every VM-booting run takes (flock, as `flock /tmp/kata-py-vm.lock`)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path} (another VM run holds it)...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            print(f"got {path} after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def proc_kib(path: str, key: str) -> int | None:
    """The `key:  N kB` field of a /proc file (status, smaps_rollup), in KiB; None if unreadable."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def cmdline(pid: int | str) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def find_pids(*needles: str) -> list[int]:
    """Pids whose NUL-joined command line contains every needle (as separate or joined args)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        joined = " ".join(cmdline(pid))
        if joined and all(n in joined for n in needles) and int(pid) != os.getpid():
            found.append(int(pid))
    return found
