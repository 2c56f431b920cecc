"""mount(2)/umount2(2) through ctypes: spawning mount(8) costs tens of ms under TCG, a syscall does not."""

import ctypes
import ctypes.util
import os

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# Options that are flags, not filesystem data (the subset Kata and mount(8) accept).
_FLAG_OPTIONS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME, "bind": MS_BIND, "rbind": MS_BIND | MS_REC,
}
_NOOP_OPTIONS = {"rw", "suid", "dev", "exec", "defaults"}


def _load_libc() -> ctypes.CDLL:
    # find_library spawns ldconfig: a process start under TCG costs boot time; the soname is enough
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


_libc = _load_libc()


def parse_options(options: list[str]) -> tuple[int, str]:
    """Split mount options into (MS_* flags, comma-joined filesystem data)."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        elif opt not in _NOOP_OPTIONS and opt:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """Call mount(2). Raises OSError (with errno and the target) on failure."""
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def umount(target: str, flags: int = 0) -> None:
    """Call umount2(2). Raises OSError on failure."""
    if _libc.umount2(target.encode(), ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    """True when `path` is listed as a mount point in /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False
