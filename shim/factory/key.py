"""The template key: everything a snapshot restore needs to match, hashed.

A clone must have the template's device set and order, `-m`, machine type, accelerator, kernel
command line and guest images, and run under the same QEMU build. Rather than list those fields
(and miss the next device someone adds), the key hashes the QEMU argv of a *canonical* config:
the config with everything that may legitimately differ per VM (state dir and sockets, shared
directory, RAM file path, VM name, vmgenid) replaced by fixed placeholders. Add the guest image's
content hash (its files may be rebuilt under the same path) and `qemu --version`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
import uuid
from pathlib import Path

from vmm.accel import AccelChoice
from vmm.cmdline import build_argv
from vmm.config import NinePShare, RamFile, SerialChannel, VirtioFsShare, VmConfig

KEY_VERSION = 1  # bump when the template layout or the restore recipe changes
_PLACEHOLDER = Path("/kata-py-template")


class NoTemplate(Exception):
    """This VM config cannot be templated (e.g. vsock: the guest CID is baked into the guest)."""


def canonical_config(cfg: VmConfig) -> VmConfig:
    """`cfg` with every per-VM backend replaced by a placeholder. Raises NoTemplate."""
    if not isinstance(cfg.agent, SerialChannel):
        raise NoTemplate("agent over vsock: the guest keeps the template's CID")
    if isinstance(cfg.shared, VirtioFsShare):
        raise NoTemplate("virtio-fs needs guest RAM shared with virtiofsd")
    shared = NinePShare(_PLACEHOLDER / "shared") if cfg.shared is not None else None
    return dataclasses.replace(
        cfg, state_dir=_PLACEHOLDER, name="template", vmgenid=uuid.UUID(int=0), console_log=None,
        agent=SerialChannel(), shared=shared, ram_file=RamFile(_PLACEHOLDER / "ram", share=True),
        incoming_defer=False, start_paused=False)


def guest_image_hash(cfg: VmConfig) -> str:
    """The guest build's content hash (manifest.json next to the standard files); for other files
    (e.g. assets named by annotations), a hash of their paths, sizes and mtimes. Raises OSError."""
    files = [p for p in (cfg.kernel, cfg.initrd, cfg.rootfs) if p is not None]
    dirs = {p.parent for p in files}
    if len(dirs) == 1 and [p.name for p in files] == ["vmlinux", "initrd.img", "rootfs.erofs"][:len(files)]:
        try:
            return "manifest:" + str(json.loads((dirs.pop() / "manifest.json").read_text())["hash"])
        except (OSError, ValueError, KeyError):
            pass
    parts = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:16]


@functools.cache
def qemu_version(qemu_binary: str = "qemu-system-x86_64") -> str:
    """First line of `qemu --version`. Raises OSError if QEMU cannot be run."""
    out = subprocess.run([qemu_binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.splitlines()[0].strip()


def template_key(cfg: VmConfig, accel: AccelChoice, guest_hash: str, qemu: str,
                 qemu_binary: str = "qemu-system-x86_64") -> str:
    """Hex key of the template that fits `cfg`. Raises NoTemplate, InvalidVmConfig."""
    argv = build_argv(canonical_config(cfg), accel, qemu_binary)
    blob = json.dumps({"v": KEY_VERSION, "guest": guest_hash, "qemu": qemu, "argv": argv[1:]})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
