"""Pure parsers for what the host probe reads: version lines, /proc/self/mountinfo, /proc/cgroups and
containerd's configuration."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .facts import KataRuntime

RUNTIME_TYPE = "io.containerd.kata-py.v2"
SHIM_BINARY = "containerd-shim-kata-py-v2"  # containerd's name for RUNTIME_TYPE's binary
# The CRI plugin that holds runtimes, by containerd config version (1: containerd 1.x's oldest form)
CRI_PLUGIN = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
# File systems other hosts (or the hypervisor) see too: sockets, flocks and the pid-named build
# directories `delete` reaps assume one host owns the state dir.
SHARED_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs", "fuse.glusterfs",
    "fuse.sshfs", "fuse.s3fs", "lustre", "gpfs", "afs", "ocfs2", "gfs2", "beegfs", "fuse.cephfs",
})

_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The first dotted version in `text` ("QEMU emulator version 7.2.22 (...)", "containerd
    github.com/containerd/containerd 1.6.20~ds1 ...", "... /v2 v2.1.9 ..."), or None."""
    for word in text.split():  # a word that starts with it: not the /v2 of a module path
        m = _VERSION.match(word)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return None


def format_version(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


@dataclass(frozen=True)
class Mount:
    point: str
    fs_type: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Lines of /proc/self/mountinfo (proc(5)); malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        a, b = left.split(), right.split()
        if not sep or len(a) < 5 or len(b) < 2:
            continue
        opts = tuple(b[2].split(",")) if len(b) > 2 else ()
        mounts.append(Mount(point=_unescape(a[4]), fs_type=b[0], source=_unescape(b[1]), super_options=opts))
    return mounts


def mount_of(path: str, mounts: Iterable[Mount]) -> Mount | None:
    """The mount `path` (absolute, symlinks resolved) lives on: the last one at the longest prefix."""
    best: Mount | None = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        inside = path == point or path.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = m
    return best


def proc_cgroups_enabled(text: str) -> set[str]:
    """Subsystems /proc/cgroups lists as enabled (v1 controllers the kernel has)."""
    enabled = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and not line.startswith("#") and parts[3] == "1":
            enabled.add(parts[0])
    return enabled


def v1_controllers(mounts: Iterable[Mount], enabled: set[str]) -> set[str]:
    """v1 controllers that are both enabled and mounted (a hierarchy's super options name them)."""
    found: set[str] = set()
    for m in mounts:
        if m.fs_type == "cgroup":
            found |= enabled & set(m.super_options)
    return found


def unified_mount(mounts: Iterable[Mount], root: str) -> str:
    """A hybrid host's cgroup2 mount below `root` ("" if none)."""
    for m in mounts:
        if m.fs_type == "cgroup2" and m.point.startswith(root.rstrip("/") + "/"):
            return m.point
    return ""


# ------------------------------------------------------------------------------ containerd config


def config_version(doc: dict[str, Any]) -> int:
    v = doc.get("version", 1)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def config_imports(doc: dict[str, Any], config_file: str) -> list[str]:
    """The `imports` patterns of a containerd config, relative ones resolved against its directory
    (as containerd does)."""
    raw = doc.get("imports", [])
    if not isinstance(raw, list):
        return []
    base = posixpath.dirname(config_file)
    return [p if posixpath.isabs(p) else posixpath.join(base, p) for p in raw if isinstance(p, str)]


def kata_runtimes(doc: dict[str, Any], file: str) -> list[KataRuntime]:
    """Every `plugins.<plugin>.containerd.runtimes.<name>` with kata-py's runtime_type."""
    found: list[KataRuntime] = []
    for plugin, body in _table(doc.get("plugins")).items():
        for name, rt in _table(_table(_table(body).get("containerd")).get("runtimes")).items():
            if not isinstance(rt, dict) or rt.get("runtime_type") != RUNTIME_TYPE:
                continue
            # BurntSushi/toml matches the Options struct's ConfigPath case-insensitively
            config_path = next((v for k, v in _table(rt.get("options")).items()
                                if k.lower() == "configpath" and isinstance(v, str)), "")
            runtime_path = _string(rt.get("runtime_path"))
            found.append(KataRuntime(file=file, plugin=plugin, name=name, config_path=config_path,
                                     runtime_path=runtime_path))
    return found


def _table(value: object) -> dict[str, Any]:
    """A TOML table, or an empty one for anything else (a config of the wrong shape is not ours)."""
    return value if isinstance(value, dict) else {}


def _string(value: object) -> str:
    return value if isinstance(value, str) else ""


def containerd_config_arg(args: list[str]) -> str:
    """The `--config`/`-c` value of a containerd command line ("" when it names none)."""
    for i, a in enumerate(args):
        for flag in ("--config", "-config", "-c"):
            if a == flag and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(flag + "="):
                return a[len(flag) + 1:]
    return ""


def path_entries(path_var: str) -> list[str]:
    return [d for d in path_var.split(":") if d]
