"""mount(2)/umount2(2) through libc, and unmounting everything below a directory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path


def _load_libc() -> ctypes.CDLL:
    # find_library runs ldconfig/gcc (tens of ms): try glibc's soname first, containerd waits on us
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


_libc = _load_libc()
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

_FLAG_OPTIONS = {"ro": MS_RDONLY, "bind": MS_BIND, "rbind": MS_BIND | MS_REC}
_IGNORED_OPTIONS = {"rw", "defaults"}


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """Raises OSError with the target in its message."""
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def umount(target: str, detach: bool = True) -> None:
    """Raises OSError (EINVAL when target is not a mount point)."""
    if _libc.umount2(target.encode(), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def mount_options(options: list[str]) -> tuple[int, str]:
    """Split fstab-style options into mount flags and the data string."""
    flags, data = 0, []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        elif opt not in _IGNORED_OPTIONS:
            data.append(opt)
    return flags, ",".join(data)


def mount_points_under(root: str | Path) -> list[str]:
    """Mount points at or below root, deepest first (the order to unmount them in)."""
    root = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(root.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: str | Path) -> None:
    """Detach every mount at or below root (best effort per mount, repeated for stacked mounts)."""
    for _ in range(8):
        points = mount_points_under(root)
        if not points:
            return
        for point in points:
            try:
                umount(point)
            except OSError:
                pass
