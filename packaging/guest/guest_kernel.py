"""Base stage, kernel half: Debian's linux-image → ELF `vmlinux` + the few modules the initrd loads."""

from __future__ import annotations

import lzma
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from guest_common import log, run

META_PACKAGE = "linux-image-amd64"

# Everything the guest needs that Debian builds as a module (=m); the initrd insmods all of them.
# Dependencies (virtio, virtio_ring, 9pnet, fuse, libcrc32c, ...) are added by modprobe.
MODULES = (
    "virtio_pci",
    "virtio_blk",  # root disk /dev/vda
    "erofs",  # root filesystem
    "overlay",  # writable tmpfs layer over the root
    "virtio_console",  # virtio-serial agent channel
    "9pnet_virtio",
    "9p",  # shared directory (kataShared)
    "virtiofs",  # virtio-fs alternative to 9p
    "virtio_net",
    "vmw_vsock_virtio_transport",  # vsock agent channel
    "virtio_mem",  # memory resize
    "virtio_rng",  # host entropy (vmm attaches virtio-rng-pci); vmgenid is built in (=y)
    "qemu_fw_cfg",  # /sys/firmware/qemu_fw_cfg: the vsock agent token (CONFIG_FW_CFG_SYSFS=m)
)

_XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class KernelPackage:
    name: str  # linux-image-6.1.0-56-amd64
    version: str  # 6.1.192-2

    @property
    def kver(self) -> str:
        return self.name.removeprefix("linux-image-")


def resolve_package() -> KernelPackage:
    """The concrete image package the meta package points at, and its candidate version."""
    deps = run(["apt-cache", "depends", META_PACKAGE], capture=True)
    m = re.search(r"Depends:\s+(linux-image-\d\S*)", deps)
    if not m:
        raise RuntimeError(f"apt-cache depends {META_PACKAGE}: no linux-image-<ver> dependency")
    name = m.group(1)
    policy = run(["apt-cache", "policy", name], capture=True)
    v = re.search(r"Candidate:\s+(\S+)", policy)
    if not v or v.group(1) == "(none)":
        raise RuntimeError(f"apt-cache policy {name}: no candidate version")
    return KernelPackage(name, v.group(1))


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF inside a bzImage: the first xz stream (after the magic) that decompresses to ELF."""
    for m in re.finditer(re.escape(_XZ_MAGIC), vmlinuz):
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = dec.decompress(vmlinuz[m.start() :])
        except lzma.LZMAError:
            continue  # the magic bytes also occur by chance
        if out.startswith(b"\x7fELF"):
            return out
    raise RuntimeError("no xz-compressed ELF found in vmlinuz")


def module_order(pkg_root: Path, kver: str, modules: tuple[str, ...]) -> list[str]:
    """Module files (relative to lib/modules/<kver>) in insmod order, each once."""
    out = run(
        ["modprobe", "-a", "-d", pkg_root, "-S", kver, "--show-depends", *modules],
        capture=True,
    )
    base = pkg_root / "lib/modules" / kver
    order: list[str] = []
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["builtin"]:
            continue  # built into the kernel: nothing to load
        if words[:1] != ["insmod"]:
            raise RuntimeError(f"unexpected modprobe output: {line}")
        rel = str(Path(words[1]).relative_to(base))
        if rel not in order:
            order.append(rel)
    return order


def build(kpkg: KernelPackage, dest: Path) -> list[str]:
    """Write dest/vmlinux, dest/modules/<rel>.ko and dest/modules.load; return the load order."""
    with tempfile.TemporaryDirectory(prefix="kata-py-kpkg-") as tmp:
        work = Path(tmp)
        log(f"downloading {kpkg.name} {kpkg.version}")
        # Sandbox user root: _apt cannot write into our private temp dir.
        run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{kpkg.name}={kpkg.version}"],
            cwd=work,
        )
        (deb,) = work.glob("*.deb")
        pkg_root = work / "pkg"
        run(["dpkg-deb", "-x", deb, pkg_root])
        vmlinuz = pkg_root / "boot" / f"vmlinuz-{kpkg.kver}"
        (dest / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        shutil.copy2(pkg_root / "boot" / f"config-{kpkg.kver}", dest / "kernel.config")
        run(["depmod", "-b", pkg_root, kpkg.kver])  # modules.dep for modprobe --show-depends
        order = module_order(pkg_root, kpkg.kver, MODULES)
        for rel in order:
            target = dest / "modules" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pkg_root / "lib/modules" / kpkg.kver / rel, target)
        (dest / "modules.load").write_text("".join(f"{rel}\n" for rel in order))
    log(f"kernel {kpkg.kver}: vmlinux {(dest / 'vmlinux').stat().st_size} bytes, {len(order)} modules")
    return order
