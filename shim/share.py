"""The host side of the guest share: exactly what of the host a sandbox's guest sees over 9p.

The guest is untrusted (docs/security.md), and QEMU's 9p server writes whatever the guest asks for
into the directory it exports. So the exported directory is not a tree the host works in:

    <state>/stage/     host-only: the shim makes containers/<cid>/rootfs and containers/<cid>/mounts/<n>
                       here (directories and empty files, mount points to be)
    <state>/shared/    what QEMU exports: a read-only, nosuid, nodev, noexec, private bind of stage/.
                       Every write the guest sends into it fails with EROFS.
    <state>/shared/containers/<cid>/rootfs, .../mounts/<n>
                       the container's rootfs and host volumes, attached onto the read-only view as
                       mounts of their own: read-write, or read-only down to every submount (set
                       before they are attached, so the guest never sees them writable), always
                       nosuid, nodev, noexec on the host

A read-only rootfs (an image snapshot containerd hands out as a read-only bind or a lower-only
overlay) is shared as an overlay of it with a small host-only tmpfs on top (<state>/scratch/<cid>/,
never exported): the guest's runtime can make its mount points, a guest root can write at most that
tmpfs, and the image layer under it, shared with every container of the image, is never written.

The guest can write only inside those mounts, and the host never walks below one: it reaches their
mount points through the read-only view (openat2 with no links, no `..`, no mount crossing) and takes
each off with one lazy detach (which takes along whatever is below it, without looking). The whole
share comes off with one detach of `shared/`, which is also all that `delete` needs after a killed
shim.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from . import mounts
from .errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

GUEST_ROOT = "/run/kata-py"  # the agent's root in the guest (agent/paths.py)
GUEST_SHARED = f"{GUEST_ROOT}/shared"  # where the agent mounts the 9p share

SCRATCH_SIZE = "16m"  # enough for the mount points a runtime makes; all a guest root could fill
_VIEW_ATTRS = mounts.MOUNT_ATTR_RDONLY | mounts.MOUNT_ATTR_NOSUID | mounts.MOUNT_ATTR_NODEV | mounts.MOUNT_ATTR_NOEXEC
# a mount the guest may write through: what it writes must never act on the host
_SUBMOUNT_ATTRS = mounts.MOUNT_ATTR_NOSUID | mounts.MOUNT_ATTR_NODEV | mounts.MOUNT_ATTR_NOEXEC


class GuestShare:
    """The share of one sandbox (or of one pool VM, whose directory a sandbox later adopts whole).

    Not thread-safe; the sandbox calls it from its own task. Raises Internal (with the path) when
    the host cannot mount, InvalidArgument for a source that cannot be shared.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.stage = state_dir / "stage"
        self.exported = state_dir / "shared"  # QEMU's 9p root
        self.scratch = state_dir / "scratch"  # host-only upper layers of read-only rootfs
        self._attached: dict[str, list[str]] = {}  # container id -> mount points under exported/, in order

    # --- the share itself -------------------------------------------------------------------
    def create(self) -> None:
        """Make stage/ and the read-only exported view of it (before QEMU starts). Idempotent."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.stage.mkdir(mode=0o700, exist_ok=True)
        self.exported.mkdir(mode=0o700, exist_ok=True)
        if self.is_mounted():
            return
        try:
            self._attach(self.stage, _open_path(self.exported), _VIEW_ATTRS, recursive=False)
        except OSError as exc:
            raise Internal(f"share {self.exported}: {exc}") from exc

    def is_mounted(self) -> bool:
        return mounts.is_mount_point(self.exported)

    def close(self) -> None:
        """Take the share off and remove stage/ (what the host made). Idempotent; never raises for
        what is already gone. Anything that would not come off is logged and left in place."""
        self._attached.clear()
        detach(self.state_dir)
        left = mounts.remove_tree(self.stage) + mounts.remove_tree(self.scratch)
        if left:
            log.error("share %s: left in place (still mounted): %s", self.state_dir, ", ".join(left))

    # --- what containers get ----------------------------------------------------------------
    def share_rootfs(self, cid: str, source: Path, *, readonly: bool) -> str:
        """Attach the container's rootfs (`source`, e.g. <bundle>/rootfs, with what is mounted
        below it; `readonly`: source is a read-only mount, shared through a scratch overlay); returns
        its path in the guest."""
        rel = f"containers/{cid}/rootfs"
        self._stub(rel, directory=True)
        if readonly:
            source = self._scratch_overlay(cid, source)
        self._attach_container(cid, rel, source, False)
        return f"{GUEST_SHARED}/{rel}"

    def share_volume(self, cid: str, index: int, source: str, *, readonly: bool,
                     follow_host: bool = False) -> str:
        """Attach host path `source` (a directory or a file, with its submounts) for the container's
        mount number `index`; returns its path in the guest. `follow_host` (an rslave or rshared
        volume): mounts made on the host below `source` later appear in the guest too (the attached
        copy is a slave of the source: it receives, it can never send). Read-only volumes never
        follow: a mount the host adds later would arrive writable."""
        try:
            is_dir = os.path.isdir(source)
        except OSError as exc:
            raise InvalidArgument(f"mount source {source!r}: {exc}") from None
        rel = f"containers/{cid}/mounts/{index}"
        self._stub(rel, directory=is_dir)
        self._attach_container(cid, rel, Path(source), readonly, follow_host=follow_host and not readonly)
        return f"{GUEST_SHARED}/{rel}"

    def unshare(self, cid: str) -> None:
        """Take off every mount attached for `cid` (last first) and remove its stage dirs.
        Idempotent; a mount that will not come off is logged and its stage dir kept."""
        for rel in reversed(self._attached.pop(cid, [])):
            with contextlib.suppress(FileNotFoundError):
                try:
                    mounts.umount(self.exported / rel)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # not mounted (any more)
                        log.error("share %s: %s", self.state_dir, exc)
        with contextlib.suppress(OSError):  # none made for a writable rootfs
            mounts.umount(self.scratch / cid)  # its overlay goes with it
        left = mounts.remove_tree(self.stage / "containers" / cid) + mounts.remove_tree(self.scratch / cid)
        if left:
            log.error("share %s: left in place (still mounted): %s", self.state_dir, ", ".join(left))

    # --- helpers ----------------------------------------------------------------------------
    def _scratch_overlay(self, cid: str, lower: Path) -> Path:
        """An overlay of read-only `lower` with a bounded tmpfs upper, in the host-only scratch dir."""
        top = self.scratch / cid
        try:
            self.scratch.mkdir(mode=0o700, exist_ok=True)
            top.mkdir(mode=0o700)
            mounts.mount("tmpfs", str(top), "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC,
                         f"size={SCRATCH_SIZE},mode=0700")
            for d in ("upper", "work", "root"):
                (top / d).mkdir(mode=0o755)
            mounts.mount("overlay", str(top / "root"), "overlay", mounts.MS_NOSUID | mounts.MS_NODEV,
                         f"lowerdir={_overlay_path(lower)},upperdir={top}/upper,workdir={top}/work")
        except OSError as exc:
            with contextlib.suppress(OSError):
                mounts.umount(top)
            raise Internal(f"container {cid}: read-only rootfs overlay: {exc}") from exc
        return top / "root"

    def _attach_container(self, cid: str, rel: str, source: Path, readonly: bool, *,
                          follow_host: bool = False) -> None:
        attrs = _SUBMOUNT_ATTRS | (mounts.MOUNT_ATTR_RDONLY if readonly else 0)
        try:
            self._attach(source, _open_beneath(self.exported, rel), attrs, recursive=True,
                         propagation=mounts.MS_SLAVE if follow_host else mounts.MS_PRIVATE)
        except OSError as exc:
            raise Internal(f"container {cid}: sharing {source}: {exc}") from exc
        self._attached.setdefault(cid, []).append(rel)

    @staticmethod
    def _attach(source: Path, target_fd: int, attrs: int, *, recursive: bool,
                propagation: int = mounts.MS_PRIVATE) -> None:
        """Clone `source`'s mount tree, set `attrs` and `propagation` on all of it while detached,
        attach it on target_fd. Closes target_fd."""
        try:
            tree = mounts.clone_tree(source, recursive=recursive)
            try:
                mounts.set_attributes(tree, attrs, propagation=propagation, recursive=True)
                mounts.attach(tree, target_fd)
            finally:
                os.close(tree)
        finally:
            os.close(target_fd)

    def _stub(self, rel: str, *, directory: bool) -> None:
        """Make the mount point `rel` (and its parents) in stage/, walking without links."""
        parts = rel.split("/")
        fd = _open_path(self.stage)
        try:
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    if last and not directory:
                        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                         0o600, dir_fd=fd))
                    else:
                        os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    if last:
                        raise Internal(f"share: {rel} exists already") from None
                if not last:
                    nxt = mounts.open_beneath(fd, name, os.O_PATH | os.O_DIRECTORY)
                    os.close(fd)
                    fd = nxt
        except OSError as exc:
            raise Internal(f"share: making {rel}: {exc}") from exc
        finally:
            os.close(fd)


def _open_path(directory: Path) -> int:
    """An O_PATH fd of a host-only directory of ours (never through a link in its last component)."""
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _open_beneath(root: Path, rel: str) -> int:
    """An O_PATH fd of root/rel, resolved strictly beneath root (no link, no mount crossing)."""
    base = _open_path(root)
    try:
        return mounts.open_beneath(base, rel, os.O_PATH)
    finally:
        os.close(base)


def _overlay_path(path: Path) -> str:
    """A path as an overlay lowerdir option: its separators (`,` `:`) and `\\` escaped."""
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def detach(state_dir: Path) -> None:
    """Take the share of `state_dir` off with everything attached below it (one lazy detach), if
    it is mounted. For a dead shim's leftovers too: needs no record of what was attached."""
    for scratch in sorted((state_dir / "scratch").glob("*")) if (state_dir / "scratch").is_dir() else ():
        with contextlib.suppress(OSError):
            mounts.umount(scratch)
    exported = state_dir / "shared"
    for _ in range(4):  # a stacked mount (never made by us, but be thorough) comes off one by one
        try:
            mounts.umount(exported)
        except OSError:
            return
