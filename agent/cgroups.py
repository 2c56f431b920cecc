"""A container's cgroup v2 files: statistics and the OOM-kill counter (file parsing), and killing
what is left in one."""

import os
import signal
from dataclasses import dataclass, field
from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"
UNLIMITED = 2**64 - 1  # how "max" is reported, as containerd's cgroup v2 stats do


@dataclass
class Stats:
    """Our copy of StatsContainerResponse (generated types stop at server.py)."""

    cpu_usage_ns: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    memory_usage: int = 0
    memory_max_usage: int = 0
    memory_limit: int = UNLIMITED
    memory_cache: int = 0
    memory_stat: dict[str, int] = field(default_factory=dict)
    pids_current: int = 0
    pids_limit: int = UNLIMITED


def container_dir(cgroup_root: str, config: dict[str, Any]) -> str:
    """The cgroup directory runc/crun create for `config` (cgroupfs driver: root + cgroupsPath)."""
    rel = config.get("linux", {}).get("cgroupsPath", "")
    return os.path.join(cgroup_root, rel.lstrip("/"))


def kill_all(cgroup_dir: str) -> None:
    """SIGKILL every process left in a container's cgroup (cgroup.kill, else one by one from
    cgroup.procs). Never raises: a cgroup already gone has nothing left to kill."""
    try:
        with open(os.path.join(cgroup_dir, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except OSError:
        pass
    for pid in (_read(os.path.join(cgroup_dir, "cgroup.procs")) or "").split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None  # controller not enabled, or the cgroup is gone: report what exists


def _flat_keyed(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _single(text: str | None, default: int) -> int:
    if text is None:
        return default
    text = text.strip()
    if text == "max":
        return UNLIMITED
    return int(text) if text.isdigit() else default


def read_stats(cgroup_dir: str) -> Stats:
    """Collect cpu, memory and pids statistics; missing files leave their fields at defaults."""
    cpu = _flat_keyed(_read(os.path.join(cgroup_dir, "cpu.stat")))
    mem = _flat_keyed(_read(os.path.join(cgroup_dir, "memory.stat")))
    usage = _single(_read(os.path.join(cgroup_dir, "memory.current")), 0)
    return Stats(
        cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        cpu_user_ns=cpu.get("user_usec", 0) * 1000,
        cpu_system_ns=cpu.get("system_usec", 0) * 1000,
        memory_usage=usage,
        memory_max_usage=_single(_read(os.path.join(cgroup_dir, "memory.peak")), usage),
        memory_limit=_single(_read(os.path.join(cgroup_dir, "memory.max")), UNLIMITED),
        memory_cache=mem.get("file", 0),
        memory_stat=mem,
        pids_current=_single(_read(os.path.join(cgroup_dir, "pids.current")), 0),
        pids_limit=_single(_read(os.path.join(cgroup_dir, "pids.max")), UNLIMITED),
    )


def oom_kills(cgroup_dir: str) -> int:
    """The cgroup's memory.events oom_kill counter (0 if unreadable)."""
    return _flat_keyed(_read(os.path.join(cgroup_dir, "memory.events"))).get("oom_kill", 0)
