"""Host mount syscalls through libc: mount(2)/umount2(2), the fd-based mount API (open_tree,
move_mount, mount_setattr, openat2), mountinfo as the kernel writes it, and removing a directory tree
without ever crossing into a mount or following a link.

Why fd-based: a bind made with mount(2) ignores MS_RDONLY and becomes read-only only with a second
remount (a window in which it is writable), and never recursively. `open_tree` clones a tree into a
detached mount, `mount_setattr` makes the whole clone read-only (AT_RECURSIVE) while nobody can see
it, and `move_mount` attaches it in one step. Linux >= 5.12 has all three; older kernels get a clear
error instead of a weaker fallback (docs/security.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from pathlib import Path


def _load_libc() -> ctypes.CDLL:
    # find_library runs ldconfig/gcc (tens of ms): try glibc's soname first, containerd waits on us
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


_libc = _load_libc()
_libc.syscall.restype = ctypes.c_long

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# x86_64 syscall numbers (the only architecture kata-py's guest build and QEMU set-up support)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

RESOLVE_NO_XDEV = 0x1
RESOLVE_NO_MAGICLINKS = 0x2
RESOLVE_NO_SYMLINKS = 0x4
RESOLVE_BENEATH = 0x8
# what every walk below a directory the guest can see uses: no link of any kind, never out of the
# directory, never into another mount
RESOLVE_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

_FLAG_OPTIONS = {"ro": MS_RDONLY, "bind": MS_BIND, "rbind": MS_BIND | MS_REC, "nosuid": MS_NOSUID,
                 "nodev": MS_NODEV, "noexec": MS_NOEXEC}
_IGNORED_OPTIONS = {"rw", "defaults", "suid", "dev", "exec"}


class MountApiMissing(OSError):
    """The kernel has no open_tree/move_mount/mount_setattr/openat2 (Linux < 5.12)."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise MountApiMissing(err, f"{what}: the kernel lacks the fd-based mount API (Linux >= 5.12 needed)")
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """Raises OSError with the target in its message."""
    rc = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def umount(target: str | Path, detach: bool = True) -> None:
    """Unmount `target` without following a link in its last component; with `detach`, lazily and
    with every mount below it. Raises OSError (EINVAL when target is not a mount point)."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def open_beneath(dir_fd: int, relpath: str, flags: int = os.O_PATH) -> int:
    """openat2(dir_fd, relpath) resolved strictly beneath dir_fd: no symlink, no magic link, no `..`
    out of it, no crossing into another mount. Returns an fd (O_CLOEXEC). Raises OSError (ELOOP for
    a link, EXDEV for a mount crossing or an escape)."""
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=0, resolve=RESOLVE_STRICT)
    rc = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(relpath), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(rc, f"open {relpath}")


def clone_tree(source: str | Path, *, recursive: bool = True) -> int:
    """A detached copy of the mount tree at `source` (open_tree OPEN_TREE_CLONE): nobody sees it until
    attach(). Returns its fd; close it to drop an unattached copy. Raises OSError."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    rc = _libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), os.fsencode(source), ctypes.c_uint(flags))
    return _check(rc, f"open_tree {source}")


def set_attributes(tree_fd: int, attr_set: int, *, propagation: int = 0, recursive: bool = True) -> None:
    """mount_setattr on a (detached) tree: set MOUNT_ATTR_* flags on it and, with `recursive`, on every
    mount below it; `propagation` (e.g. MS_PRIVATE) likewise. Raises OSError."""
    attr = _MountAttr(attr_set=attr_set, attr_clr=0, propagation=propagation, userns_fd=0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    rc = _libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(tree_fd), b"", ctypes.c_uint(flags),
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(rc, "mount_setattr")


def attach(tree_fd: int, target_fd: int) -> None:
    """move_mount the detached tree onto the object `target_fd` (an O_PATH fd) names. Raises OSError."""
    rc = _libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(tree_fd), b"", ctypes.c_int(target_fd), b"",
                       ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
    _check(rc, "move_mount")


def bind(source: str | Path, target: str | Path, *, readonly: bool, recursive: bool) -> None:
    """Bind `source` on `target` (a host path of ours), read-only from the first instant when asked
    (down to every submount with `recursive`). Raises OSError."""
    tree = clone_tree(source, recursive=recursive)
    try:
        set_attributes(tree, MOUNT_ATTR_RDONLY if readonly else 0, recursive=True)
        target_fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            attach(tree, target_fd)
        finally:
            os.close(target_fd)
    finally:
        os.close(tree)


def mount_options(options: list[str]) -> tuple[int, str]:
    """Split fstab-style options into mount flags and the data string."""
    flags, data = 0, []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        elif opt not in _IGNORED_OPTIONS:
            data.append(opt)
    return flags, ",".join(data)


def unescape_mountinfo(field: bytes) -> str:
    """A path field of /proc/<pid>/mountinfo: the kernel escapes exactly space, tab, newline and
    backslash as three octal digits (\\040 ...); everything else, UTF-8 or not, is raw bytes."""
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == 0x5C and i + 3 < len(field) and all(c in b"01234567" for c in field[i + 1:i + 4]):
            out.append(int(field[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_points(mountinfo: bytes) -> list[str]:
    """Every mount point in a mountinfo text, in its order."""
    return [unescape_mountinfo(line.split(b" ")[4]) for line in mountinfo.splitlines() if line.strip()]


def mount_points_under(root: str | Path) -> list[str]:
    """Mount points at or below root, deepest first (the order to unmount them in)."""
    root = os.path.realpath(root)
    with open("/proc/self/mountinfo", "rb") as f:
        points = mount_points(f.read())
    found = {p for p in points if p == root or p.startswith(root.rstrip("/") + "/")}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def is_mount_point(path: str | Path) -> bool:
    return os.path.realpath(path) in set(mount_points(Path("/proc/self/mountinfo").read_bytes()))


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


def remove_tree(root: str | Path) -> list[str]:
    """Remove `root` and everything in it, never following a link and never descending into a mount
    (each step is an openat2 that refuses to cross one: a bind mount of the same filesystem has the
    same st_dev, so device numbers cannot tell). A mount point that is still there is left with its
    parents and named in the result: the user data behind a mount that did not come off is never
    touched. A missing root is not an error. Returns what was left."""
    path = os.path.abspath(os.fspath(root))
    try:
        parent = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    left: list[str] = []
    try:
        name = os.path.basename(path)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return []
        if stat.S_ISDIR(st.st_mode):
            _remove_dir(parent, name, path, left)
        else:
            _unlink(parent, name, path, left)
    finally:
        os.close(parent)
    return left


def _unlink(dir_fd: int, name: str, path: str, left: list[str]) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:  # EBUSY: a file something is mounted on
            raise
        left.append(path)
        return False
    return True


def _remove_dir(parent_fd: int, name: str, path: str, left: list[str]) -> bool:
    """Empty and remove directory `name` of parent_fd; False if something had to stay."""
    try:
        fd = open_beneath(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ELOOP):
            raise
        left.append(path)  # a mount point (or a link that replaced the directory): not ours to enter
        return False
    try:
        clean = True
        for entry in os.scandir(fd):
            child = os.path.join(path, entry.name)
            if entry.is_dir(follow_symlinks=False):
                clean = _remove_dir(fd, entry.name, child, left) and clean
            else:
                clean = _unlink(fd, entry.name, child, left) and clean
    finally:
        os.close(fd)
    if clean:
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            left.append(path)
            return False
    return clean
