"""What the agent does as PID 1 before serving: mount the API filesystems and set up cgroup2."""

import ctypes
import fcntl
import os
import socket
import struct

from agent import mounts

CGROUP_CONTROLLERS = ("cpu", "memory", "pids", "cpuset")
PR_SET_CHILD_SUBREAPER = 36

# (source, target, fstype, flags, data); each skipped when already a mount point (the initrd may
# have moved some of them across switch_root).
_MOUNTS = [
    ("proc", "/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", mounts.MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", mounts.MS_NOSUID | mounts.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("shm", "/dev/shm", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC, ""),
]


def mount_api_filesystems() -> list[str]:
    """Mount proc, sys, dev, devpts, shm, run, tmp and cgroup2; return messages for the failures
    (the agent keeps going: a missing /dev/shm should not make the whole VM unreachable)."""
    problems = []
    for source, target, fstype, flags, data in _MOUNTS:
        # Mount points are read from /proc, so /proc itself is checked by its contents.
        if os.path.exists("/proc/self") if target == "/proc" else mounts.is_mountpoint(target):
            continue
        try:
            os.makedirs(target, exist_ok=True)
            mounts.mount(source, target, fstype, flags, data)
        except OSError as e:
            problems.append(str(e))
    if os.path.exists("/dev/pts/ptmx") and not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    # what udev/systemd would create; tools open /dev/stdin and friends by name
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                         ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2")):
        if not os.path.lexists(link):
            try:
                os.symlink(target, link)
            except OSError as e:
                problems.append(f"{link}: {e}")
    return problems


def enable_cgroup_controllers(cgroup_root: str = "/sys/fs/cgroup") -> list[str]:
    """Enable our controllers in the root's cgroup.subtree_control; return the ones that failed."""
    try:
        with open(os.path.join(cgroup_root, "cgroup.controllers")) as f:
            available = set(f.read().split())
    except OSError:
        return list(CGROUP_CONTROLLERS)
    failed = []
    for name in CGROUP_CONTROLLERS:
        if name not in available:
            failed.append(name)
            continue
        try:
            with open(os.path.join(cgroup_root, "cgroup.subtree_control"), "w") as f:
                f.write(f"+{name}")
        except OSError:
            failed.append(name)
    return failed


def become_subreaper() -> None:
    """Adopt orphaned descendants (container processes) when the agent is not PID 1.
    Raises OSError if prctl fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def loopback_up() -> None:
    """Bring `lo` up (no udev/systemd/ifupdown in the guest does it). Raises OSError."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, request))[1]
        if not flags & iff_up:
            fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))
