#!/usr/bin/env python3
"""Build the kata-py guest image: vmlinux, initrd.img, rootfs.erofs, manifest.json, cmdline.

    python3 packaging/guest/build_guest.py [--out-root DIR] [--print-dir] [--force]

Two cached layers, each named by a content hash of its inputs, so CI rebuilds only what changed:
  <out-root>/base-<hash>/  kernel (vmlinux + modules) and the Debian/PyPI rootfs tree (minutes);
  <out-root>/<hash>/       the artefacts: base + agent/ and protos/ sources + initrd (seconds).
`<out-root>/current` points at the newest artefact directory. Stdlib only; runs as root.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Sibling modules: packaging/ is deliberately not a Python package (it would shadow PyPI's `packaging`).
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import guest_image  # noqa: E402
import guest_kernel  # noqa: E402
import guest_rootfs  # noqa: E402
from guest_common import (  # noqa: E402
    digest_files,
    link_or_copy,
    log,
    py_sources,
    remove_tree,
    source_date_epoch,
    staging_dir,
)

REPO = HERE.parents[1]
DEFAULT_OUT_ROOT = Path("/var/cache/kata-py/guest")
ENV_OUT_ROOT = "KATA_PY_GUEST_CACHE"
KEEP_FINAL = 3  # artefact dirs kept besides `current`: running VMs and templates may still use them
BASE_STAGE_CODE = [HERE / "guest_common.py", HERE / "guest_kernel.py", HERE / "guest_rootfs.py"]
FINAL_STAGE_CODE = [HERE / "build_guest.py", HERE / "guest_image.py", guest_image.INIT_SCRIPT]
ARTEFACTS = ("vmlinux", "initrd.img", "rootfs.erofs")
_FINAL_NAME = re.compile(r"^[0-9a-f]{16}$")


def _short_hash(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def base_inputs() -> dict[str, object]:
    """Everything the base layer depends on (asks apt for the kernel's current version)."""
    kpkg = guest_kernel.resolve_package()
    return {
        "kernel_package": kpkg.name,
        "kernel_version": kpkg.version,
        "modules": list(guest_kernel.MODULES),
        "on_demand_modules": list(guest_kernel.ON_DEMAND_MODULES),
        "mirror": guest_rootfs.apt_mirror(),
        "suite": guest_rootfs.SUITE,
        "include": list(guest_rootfs.INCLUDE),
        "pip": guest_rootfs.pip_versions(),
        "code": digest_files(HERE, BASE_STAGE_CODE),
    }


def base_hash(inputs: dict[str, object]) -> str:
    return _short_hash(inputs)


def final_inputs(base: str, repo: Path = REPO) -> dict[str, object]:
    """The final layer's inputs: the base, our guest-side sources, initrd and packing code."""
    return {
        "base": base,
        "sources": {pkg: digest_files(repo, py_sources(repo / pkg)) for pkg in guest_image.SOURCE_PACKAGES},
        "code": digest_files(HERE, FINAL_STAGE_CODE),
        "busybox": hashlib.sha256(guest_image.BUSYBOX.read_bytes()).hexdigest(),
        "source_date_epoch": source_date_epoch(),
    }


def final_hash(base: str, repo: Path = REPO) -> str:
    return _short_hash(final_inputs(base, repo))


def ensure_base(out_root: Path, inputs: dict[str, object], force: bool) -> Path:
    bdir = out_root / f"base-{base_hash(inputs)}"
    if bdir.is_dir() and not force:
        log(f"base layer cached: {bdir}")
        return bdir
    t0 = time.monotonic()
    with staging_dir(bdir) as tmp:
        kpkg = guest_kernel.KernelPackage(str(inputs["kernel_package"]), str(inputs["kernel_version"]))
        modules = guest_kernel.build(kpkg, tmp)
        versions = guest_rootfs.build(tmp / "rootfs", str(inputs["mirror"]), guest_rootfs.pip_versions())
        guest_kernel.install_modules(tmp, tmp / "rootfs", kpkg.kver)
        versions[kpkg.name] = kpkg.version
        info = {
            "hash": bdir.name.removeprefix("base-"),
            "inputs": inputs,
            "kernel": {"package": kpkg.name, "version": kpkg.version, "release": kpkg.kver},
            "modules": modules.initrd,
            "rootfs_modules": len(modules.rootfs),
            "packages": versions,
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (tmp / "base.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log(f"base layer built in {time.monotonic() - t0:.1f}s: {bdir}")
    return bdir


def ensure_final(out_root: Path, bdir: Path, repo: Path, force: bool) -> Path:
    base = json.loads((bdir / "base.json").read_text())
    inputs = final_inputs(base["hash"], repo)
    fdir = out_root / _short_hash(inputs)
    if fdir.is_dir() and not force:
        log(f"artefacts cached: {fdir}")
        return fdir
    t0 = time.monotonic()
    mtime = source_date_epoch()
    with staging_dir(fdir) as tmp:
        work = tmp / ".work"
        try:
            guest_image.build_initrd(bdir, tmp / "initrd.img", work, mtime)
            guest_image.build_rootfs(bdir, repo, tmp / "rootfs.erofs", work, mtime, fdir.name)
        finally:
            remove_tree(work)
        link_or_copy(bdir / "vmlinux", tmp / "vmlinux")  # a link survives pruning of the base
        (tmp / "cmdline").write_text(guest_image.KERNEL_CMDLINE + "\n")
        manifest = {
            "hash": fdir.name,
            "base_hash": base["hash"],
            "inputs": inputs,
            "kernel": base["kernel"],
            "kernel_version": base["kernel"]["release"],
            "cmdline": guest_image.KERNEL_CMDLINE,
            "modules": base["modules"],
            "rootfs_modules": base.get("rootfs_modules", 0),
            "files": {name: (tmp / name).stat().st_size for name in ARTEFACTS},
            "packages": base["packages"],
            "build_seconds": {"base": base["build_seconds"], "final": round(time.monotonic() - t0, 1)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log(f"artefacts built in {time.monotonic() - t0:.1f}s: {fdir}")
    return fdir


def update_current(out_root: Path, fdir: Path) -> None:
    link = out_root / "current"
    tmp = out_root / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(fdir.name)  # relative: the cache may be moved or bind-mounted
    os.replace(tmp, link)  # atomic: readers see the old or the new target, never none


def prune(out_root: Path, keep: int = KEEP_FINAL) -> None:
    """Drop old artefact dirs (keep `current` + the newest few) and bases no kept dir was built from."""
    current = (out_root / "current").resolve()
    finals = sorted(
        (d for d in out_root.iterdir() if d.is_dir() and _FINAL_NAME.match(d.name)),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    kept = finals[:keep] + ([current] if current.is_dir() else [])
    for d in finals:
        if d not in kept:
            log(f"pruning {d}")
            remove_tree(d)
    wanted = set()
    for d in kept:
        try:
            wanted.add("base-" + json.loads((d / "manifest.json").read_text())["base_hash"])
        except (OSError, ValueError, KeyError):
            continue
    for b in out_root.glob("base-*"):
        if b.is_dir() and b.name not in wanted:
            log(f"pruning {b}")
            remove_tree(b)


def build(out_root: Path, force: bool = False, repo: Path = REPO) -> Path:
    """Build (or find in the cache) the artefacts; return their directory. One build at a time."""
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bdir = ensure_base(out_root, base_inputs(), force)
        fdir = ensure_final(out_root, bdir, repo, force)
        update_current(out_root, fdir)
        prune(out_root)
    return fdir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_root = Path(os.environ.get(ENV_OUT_ROOT, DEFAULT_OUT_ROOT))
    ap.add_argument("--out-root", type=Path, default=default_root, help=f"cache root (env {ENV_OUT_ROOT})")
    ap.add_argument("--print-dir", action="store_true", help="print the artefact directory on stdout")
    ap.add_argument("--force", action="store_true", help="rebuild both layers even if cached")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("must run as root (debootstrap, chroot)")
    for tool in ("debootstrap", "mkfs.erofs", "modprobe", "depmod", "dpkg-deb", "apt-get", "chroot"):
        if shutil.which(tool) is None:
            ap.error(f"missing tool: {tool}")
    fdir = build(args.out_root.resolve(), args.force)
    if args.print_dir:
        print(fdir)
    else:
        log(f"done: {fdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
