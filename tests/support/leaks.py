"""What a test may leave behind, snapshotted before and compared after.

Processes (QEMU, shims, containerd, agents), shim sockets, mounts, network namespaces, tap devices
and kata-py cgroups. A test that leaks fails, naming what it left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .containerd import namespace_cgroups

WATCHED_PROGRAMS = ("containerd", "containerd-shim-kata-py-v2")  # by argv[0]'s basename
WATCHED_PROCESSES = ("qemu-system", "-m shim ", "-m agent ")  # anywhere in the command line


def _processes() -> set[str]:
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        program = os.path.basename(raw.split(b"\0", 1)[0].decode(errors="replace"))
        if program in WATCHED_PROGRAMS or any(w in cmd + " " for w in WATCHED_PROCESSES):
            found.add(f"{pid}: {cmd[:160]}")
    return found


def _listdir(path: str) -> set[str]:
    try:
        return {f"{path}/{n}" for n in os.listdir(path)}
    except OSError:
        return set()


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def _cgroups() -> set[str]:
    found = {str(p) for p in namespace_cgroups()}  # our containerd namespaces' level
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        for d in dirs:
            if d.startswith("kata_"):  # ours: kata_<sandbox> and kata_overhead
                found.add(os.path.join(root, d))
    return found


def _links() -> set[str]:
    return {n for n in _listdir("/sys/class/net") if "tap" in n.rsplit("/", 1)[-1]}


@dataclass(frozen=True)
class Snapshot:
    processes: frozenset[str]
    sockets: frozenset[str]
    mounts: frozenset[str]
    netns: frozenset[str]
    links: frozenset[str]
    cgroups: frozenset[str]


def snapshot() -> Snapshot:
    return Snapshot(frozenset(_processes()), frozenset(_listdir("/run/containerd/s")), frozenset(_mounts()),
                    frozenset(_listdir("/run/netns")), frozenset(_links()), frozenset(_cgroups()))


def leaked(before: Snapshot, after: Snapshot) -> list[str]:
    out = []
    for field in ("processes", "sockets", "mounts", "netns", "links", "cgroups"):
        new = sorted(getattr(after, field) - getattr(before, field))
        out += [f"{field}: {item}" for item in new]
    return out
