"""What a test may leave behind, snapshotted before and compared after: only what this run owns.

Processes carrying the run's mark (tests/support/owned.py: containerd, shims, QEMU, loggers, anything
the run started), shim sockets that are stale or held by such a process, mounts below directories the
run made, network namespaces and bridges named with the run's tag (owned.test_name), kata-py taps,
and kata-py cgroups. A test that
leaks fails, naming what it left. A host with live pods, or another suite beside this one, is neither
blamed nor touched: their processes lack the mark, their mounts are elsewhere.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import owned
from .containerd import namespace_cgroups

SHIM_SOCKETS = "/run/containerd/s"
TEST_DIR = re.compile(r"(kp|ttrpc)")  # the prefixes of the suite's temp dirs under /tmp
_TAP = re.compile(r"tap\d+_kp")  # shim/network/translate.py's tap names


def _processes() -> set[str]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid() or not owned.process_is_ours(int(pid)):
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if raw:  # a zombie has none: its parent (ours) reaps it
            cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
            found.add(f"{pid}: {cmd[:160]}")
    return found


def _listdir(path: str) -> set[str]:
    try:
        return {f"{path}/{n}" for n in os.listdir(path)}
    except OSError:
        return set()


_session_temp_dirs: set[str] | None = None


def _run_dirs() -> set[str]:
    """The suite's temp dirs under /tmp made since the run began (with the explicitly owned ones)."""
    global _session_temp_dirs
    now = {p for p in _listdir(tempfile.gettempdir()) if TEST_DIR.match(os.path.basename(p))}
    if _session_temp_dirs is None:
        _session_temp_dirs = now  # the first snapshot of the run: what was there is not ours
    return (now - _session_temp_dirs) | owned.roots()


def _mounts() -> set[str]:
    roots = _run_dirs()
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f}
    return {p for p in points if any(p == r or p.startswith(r + "/") for r in roots)
            or (p.startswith("/run/netns/") and _test_named(os.path.basename(p)))}


def _test_named(name: str) -> bool:
    return owned.is_test_named(name)


def _cgroups() -> set[str]:
    found = {str(p) for p in namespace_cgroups()}  # our containerd namespaces' level
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        for d in dirs:
            if d.startswith("kata_"):  # ours: kata_<sandbox> and kata_overhead
                found.add(os.path.join(root, d))
    return found


def _links() -> set[str]:
    return {p for p in _listdir("/sys/class/net") if _TAP.fullmatch(os.path.basename(p)) or _test_named(os.path.basename(p))}


def _netns() -> set[str]:
    return {p for p in _listdir("/run/netns") if _test_named(os.path.basename(p))}


def _socket_holders() -> dict[str, int]:
    """Path -> inode of every bound unix socket below SHIM_SOCKETS."""
    out = {}
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7].startswith(SHIM_SOCKETS + "/"):
                    out[fields[7]] = int(fields[6])
    except OSError:
        pass
    return out


def _held_by_us(inode: int) -> bool:
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if not owned.process_is_ours(int(pid)):
            continue
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                return True
        except OSError:
            continue
    return False


def _ours(new_sockets: list[str]) -> list[str]:
    """Of the new shim sockets, those that are ours: stale (nobody listens) or held by our process."""
    if not new_sockets:
        return []
    holders = _socket_holders()
    return [s for s in new_sockets if s not in holders or _held_by_us(holders[s])]


@dataclass(frozen=True)
class Snapshot:
    processes: frozenset[str]
    sockets: frozenset[str]
    mounts: frozenset[str]
    netns: frozenset[str]
    links: frozenset[str]
    cgroups: frozenset[str]


def snapshot() -> Snapshot:
    owned.mark_this_run()
    return Snapshot(frozenset(_processes()), frozenset(_listdir(SHIM_SOCKETS)), frozenset(_mounts()),
                    frozenset(_netns()), frozenset(_links()), frozenset(_cgroups()))


def leaked(before: Snapshot, after: Snapshot) -> list[str]:
    out = []
    for field in ("processes", "sockets", "mounts", "netns", "links", "cgroups"):
        new = sorted(getattr(after, field) - getattr(before, field))
        if field == "sockets":
            new = _ours(new)
        out += [f"{field}: {item}" for item in new]
    return out
