"""Small helpers shared by the guest build stages (stdlib only: the build runs before any venv)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

_T0 = time.monotonic()


def log(msg: str) -> None:
    # stdout is reserved for --print-dir, so progress goes to stderr.
    print(f"[build-guest {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str | os.PathLike[str]], *, capture: bool = False, check: bool = True, **kw: object
) -> str:
    """Run a command, its output on stderr (or captured); raise CalledProcessError on failure."""
    res = subprocess.run(
        [str(a) for a in argv],
        check=check,
        text=True,
        stdout=subprocess.PIPE if capture else sys.stderr,
        **kw,  # type: ignore[arg-type]
    )
    return res.stdout if capture else ""


def digest_files(root: Path, paths: Sequence[Path]) -> str:
    """sha256 over (relative path, content) pairs, in sorted order, so renames count too."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def py_sources(top: Path) -> list[Path]:
    """The *.py files under top, without caches: what the guest gets of a source package."""
    return sorted(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)


def source_date_epoch() -> int:
    # Fixed timestamps make cpio and erofs output reproducible; honour the usual override.
    return int(os.environ.get("SOURCE_DATE_EPOCH", "1"))


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first (for unmounting)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf that first detaches anything a failed debootstrap left mounted inside."""
    for mnt in mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temp dir next to `final`, renamed onto it on success and removed on failure.

    Same filesystem as `final`, so the rename is atomic: readers see the whole layer or none.
    """
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():  # --force: swap the new layer in, then drop the old one
            final.rename(old)
        tmp.rename(final)
    finally:
        remove_tree(tmp)
        remove_tree(old)


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard link (no copy of a 66 MB kernel) unless src is on another filesystem."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
