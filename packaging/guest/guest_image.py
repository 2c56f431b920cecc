"""Final stage: base layer + our sources → `initrd.img` and `rootfs.erofs` (seconds, not minutes)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import uuid
from pathlib import Path

from guest_common import log, py_sources, run

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
APPLETS = ("sh", "mount", "insmod", "mkdir", "sleep", "switch_root", "cat", "echo", "ls")
GUEST_SRC_DIR = "opt/kata-py"  # PYTHONPATH in the guest (architecture.md, guest contract)
SOURCE_PACKAGES = ("agent", "protos")

# Base kernel arguments every VM must use; vmm adds kata_py.channel=... and friends.
KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 reboot=t tsc=reliable no_timer_check noreplace-smp "
    "rcupdate.rcu_expedited=1 i8042.noaux i8042.nokbd i8042.nopnp i8042.dumbkbd "
    "cryptomgr.notests rdinit=/init memhp_default_state=online_movable"
)


def _cpio_entry(name: str, mode: int, data: bytes, mtime: int, ino: int) -> bytes:
    # "newc" format: 110-byte ASCII header, name and data each padded to 4 bytes.
    fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def write_cpio_gz(tree: Path, dest: Path, mtime: int) -> None:
    """Pack tree as a gzipped newc cpio in sorted order with fixed owners and mtimes (reproducible)."""
    buf = io.BytesIO()
    paths = sorted(tree.rglob("*"), key=lambda p: p.relative_to(tree).parts)
    for ino, p in enumerate(paths, start=1):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(p).encode()
        elif stat.S_ISREG(st.st_mode):
            data = p.read_bytes()
        else:
            data = b""
        buf.write(_cpio_entry(str(p.relative_to(tree)), st.st_mode, data, mtime, ino))
    buf.write(_cpio_entry("TRAILER!!!", 0, b"", 0, 0))
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=mtime) as gz:
        gz.write(buf.getvalue())


def build_initrd(base: Path, dest: Path, work: Path, mtime: int) -> None:
    tree = work / "initrd"
    for d in ("bin", "dev", "proc", "sys", "etc", "lower", "rw", "newroot"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    for applet in APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    shutil.copytree(base / "modules", tree / "lib/modules")
    shutil.copy2(base / "modules.load", tree / "etc/modules.load")
    shutil.copy2(INIT_SCRIPT, tree / "init")
    (tree / "init").chmod(0o755)
    write_cpio_gz(tree, dest, mtime)


def build_rootfs(base: Path, repo: Path, dest: Path, work: Path, mtime: int, image_hash: str) -> None:
    root = work / "rootfs"
    # Hard-link copy: fast and cheap; we only add files, never modify the base's inodes.
    run(["cp", "-al", base / "rootfs", root])
    opt = root / GUEST_SRC_DIR
    for pkg in SOURCE_PACKAGES:
        for src in py_sources(repo / pkg):
            target = opt / src.relative_to(repo)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    # Same pyc policy as the base (see guest_rootfs); a syntax error in a work-in-progress agent
    # file must not break the image, so compileall's exit status is ignored.
    run(
        ["chroot", root, "/usr/bin/python3", "-m", "compileall", "-q", "-j0",
         "--invalidation-mode", "unchecked-hash", f"/{GUEST_SRC_DIR}"],
        check=False,
    )  # fmt: skip
    fs_uuid = str(uuid.UUID(bytes=bytes.fromhex(image_hash.ljust(32, "0")[:32])))
    run(["mkfs.erofs", "--quiet", "--all-root", f"-T{mtime}", f"-U{fs_uuid}", dest, root])
    log(f"rootfs.erofs {dest.stat().st_size} bytes")
