"""Sandbox and container storages: make a host-described filesystem appear at a guest path.

Drivers: `9p` (virtio-9p, source = mount tag), `virtio-fs` (source = tag), `ephemeral` (tmpfs; options
such as size=, mode=, uid=, gid= are tmpfs's own), `bind` (source = a guest path inside the agent
root), `local` (a plain directory; options mode=, uid=, gid=). Every mount point and
bind source must resolve inside the agent root.
"""

import os
import shutil
import threading
from dataclasses import dataclass, field

from agent import mounts
from agent.errors import Internal, InvalidArgument
from agent.paths import resolve_inside

DRIVERS = ("9p", "virtio-fs", "ephemeral", "bind", "local")
_DEFAULT_MSIZE = 512 * 1024  # larger than the 8 KiB default: far fewer virtio round trips for I/O
# a virtio-9p channel takes one mount at a time (EBUSY otherwise): the clone warm-up's brief look at
# the share (agent/warm_up.py) and a real mount of it take turns
NINEP_MOUNT_LOCK = threading.Lock()


@dataclass(frozen=True)
class StorageSpec:
    """Our own copy of the wire `Storage` message (generated types stop at server.py)."""

    driver: str
    source: str = ""
    fstype: str = ""
    options: list[str] = field(default_factory=list)
    driver_options: list[str] = field(default_factory=list)
    mount_point: str = ""


@dataclass(frozen=True)
class Mounted:
    """What `mount_storage` did, so `unmount_storage` can undo exactly that."""

    driver: str
    path: str
    is_mount: bool


def mount_storage(spec: StorageSpec, root: str, field_name: str = "storage") -> Mounted:
    """Make `spec` available at its mount point (created if needed) and return how to undo it.

    Raises InvalidArgument for an unknown driver or a path outside `root`, Internal if the mount fails.
    """
    if spec.driver not in DRIVERS:
        raise InvalidArgument(f"{field_name}.driver: unsupported storage driver {spec.driver!r} "
                              f"(supported: {', '.join(DRIVERS)})")
    target = resolve_inside(root, spec.mount_point, f"{field_name}.mount_point")
    flags, data = mounts.parse_options(spec.options)
    try:
        os.makedirs(target, exist_ok=True)
        if spec.driver == "local":
            _own_directory(target, spec.options)
            return Mounted(spec.driver, target, is_mount=False)
        if spec.driver == "bind":
            source = resolve_inside(root, spec.source, f"{field_name}.source")
            mounts.mount(source, target, "", flags | mounts.MS_BIND)
            if flags & mounts.MS_RDONLY:  # a bind mount ignores MS_RDONLY until remounted
                mounts.mount("", target, "", flags | mounts.MS_BIND | mounts.MS_REMOUNT)
        elif spec.driver == "ephemeral":
            mounts.mount("tmpfs", target, "tmpfs", flags, data)
        elif spec.driver == "9p":
            if not spec.source:
                raise InvalidArgument(f"{field_name}.source: 9p needs a mount tag")
            opts = ["trans=virtio", "version=9p2000.L"]
            if "msize=" not in data:
                opts.append(f"msize={_DEFAULT_MSIZE}")
            with NINEP_MOUNT_LOCK:
                mounts.mount(spec.source, target, "9p", flags, ",".join(opts + ([data] if data else [])))
        else:  # virtio-fs
            if not spec.source:
                raise InvalidArgument(f"{field_name}.source: virtio-fs needs a mount tag")
            mounts.mount(spec.source, target, "virtiofs", flags, data)
    except OSError as e:
        raise Internal(f"{field_name}: {e}") from e
    return Mounted(spec.driver, target, is_mount=True)


def _own_directory(path: str, options: list[str]) -> None:
    """mode=<octal> (default 0777, like Kata: scratch space for any container user), uid=, gid= (the
    host directory's owner, e.g. a pod's fsGroup). Raises InvalidArgument for a malformed option."""
    values = dict(o.split("=", 1) for o in options if "=" in o)
    try:
        mode = int(values.get("mode", "777"), 8)
        uid, gid = int(values.get("uid", "-1")), int(values.get("gid", "-1"))
    except ValueError as e:
        raise InvalidArgument(f"local storage options {options}: {e}") from e
    os.chown(path, uid, gid)
    os.chmod(path, mode & 0o7777)


def unmount_storage(m: Mounted) -> None:
    """Undo `mount_storage`: lazy-unmount mounts, remove `local` directories. Raises Internal on failure."""
    try:
        if m.is_mount:
            mounts.umount(m.path, mounts.MNT_DETACH)
        else:
            shutil.rmtree(m.path, ignore_errors=True)
    except OSError as e:
        raise Internal(f"unmount {m.path}: {e}") from e
