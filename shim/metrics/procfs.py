"""A host process's resource use from /proc: CPU seconds, RSS, PSS, threads, open fds.

Parsing is pure (`parse_stat`, `parse_smaps_rollup`); `read_process` does the reads and is meant for
a worker thread (smaps_rollup walks the whole address space: a few ms for a QEMU with a big guest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcessStats:
    user_seconds: float
    system_seconds: float
    threads: int
    rss_bytes: int
    pss_bytes: int | None  # None: smaps_rollup unreadable (kernel without it, or not permitted)
    open_fds: int | None


@dataclass(frozen=True, slots=True)
class StatFields:
    utime_ticks: int
    stime_ticks: int
    threads: int
    rss_pages: int


def parse_stat(text: str) -> StatFields:
    """/proc/<pid>/stat: the fields after "(comm)" (comm may hold spaces and parentheses).
    Raises ValueError for a malformed line."""
    try:
        fields = text.rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): utime 14, stime 15, num_threads 20, rss 24
        return StatFields(utime_ticks=int(fields[11]), stime_ticks=int(fields[12]), threads=int(fields[17]),
                          rss_pages=int(fields[21]))
    except IndexError:
        raise ValueError("malformed /proc/<pid>/stat") from None


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup: each `Key: N kB` line, in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def read_process(pid: int) -> ProcessStats:
    """Raises OSError when the process is gone (or unreadable), ValueError for a malformed stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = parse_stat(f.read())
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    pss: int | None = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = parse_smaps_rollup(f.read()).get("Pss")
    except OSError:
        pass
    fds: int | None = None
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return ProcessStats(user_seconds=stat.utime_ticks / ticks, system_seconds=stat.stime_ticks / ticks,
                        threads=stat.threads, rss_bytes=stat.rss_pages * page, pss_bytes=pss, open_fds=fds)
