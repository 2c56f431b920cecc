"""Base stage, kernel half: Debian's linux-image → ELF `vmlinux`, the few modules the initrd loads, and
the modules the guest loads on demand (its rootfs's /lib/modules/<kver>, indexed by the guest's depmod)."""

from __future__ import annotations

import lzma
import os
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

# What containers use of the kernel (privileged ones, or with CAP_NET_ADMIN/CAP_SYS_ADMIN): CNI
# plugins, kube-proxy and kind/k3s/docker-in-a-pod, iptables (nft and legacy), tc, overlay/loop
# mounts. Not loaded at boot: the kernel's request_module runs the guest's /sbin/modprobe (kmod) the
# first time one is needed (`ip link add ... type bridge`, an nft table, `mount -t xfs`, ...).
# Dependencies are added by modprobe, as for MODULES.
ON_DEMAND_MODULES = (
    # links and tunnels
    "bridge", "br_netfilter", "veth", "vxlan", "geneve", "macvlan", "macvtap", "ipvlan", "ipvtap",
    "dummy", "8021q", "tun", "ifb", "vrf", "ipip", "ip_gre", "sit", "ip6_tunnel", "wireguard",
    "openvswitch", "sctp",
    # netfilter core, nf_tables (iptables-nft, nft)
    "nf_conntrack", "nf_conntrack_netlink", "nf_nat", "nfnetlink_log", "nfnetlink_queue", "nf_log_syslog",
    "nf_tables", "nft_compat", "nft_chain_nat", "nft_ct", "nft_nat", "nft_masq", "nft_redir",
    "nft_reject_inet", "nft_reject_ipv4", "nft_reject_ipv6", "nft_fib_inet", "nft_fib_ipv4",
    "nft_fib_ipv6", "nft_limit", "nft_numgen", "nft_hash", "nft_quota", "nft_tproxy", "nft_socket",
    "nft_log", "nft_queue", "nft_objref",
    # legacy xtables (iptables-legacy, ip6tables, ebtables) and the matches/targets in common use
    "ip_tables", "iptable_filter", "iptable_nat", "iptable_mangle", "iptable_raw", "iptable_security",
    "ip6_tables", "ip6table_filter", "ip6table_nat", "ip6table_mangle", "ip6table_raw",
    "ip6table_security", "ebtable_filter", "ebtable_nat", "ebtable_broute",
    "ipt_REJECT", "ip6t_REJECT", "ipt_rpfilter", "ip6t_rpfilter", "ip6t_ipv6header",
    "xt_conntrack", "xt_state", "xt_MASQUERADE", "xt_REDIRECT", "xt_nat", "xt_addrtype", "xt_comment",
    "xt_mark", "xt_connmark", "xt_multiport", "xt_statistic", "xt_recent", "xt_set", "xt_physdev",
    "xt_limit", "xt_hashlimit", "xt_connlimit", "xt_owner", "xt_pkttype", "xt_NFLOG", "xt_NFQUEUE",
    "xt_CT", "xt_TPROXY", "xt_socket", "xt_u32", "xt_bpf", "xt_CHECKSUM", "xt_tcpmss", "xt_TCPMSS",
    "xt_LOG", "xt_iprange", "xt_length", "xt_mac", "xt_dscp", "xt_DSCP", "xt_HL", "xt_hl", "xt_ipvs",
    "xt_cgroup", "xt_string", "xt_helper", "xt_devgroup",
    # ipset, IPVS (kube-proxy's ipvs mode)
    "ip_set", "ip_set_hash_ip", "ip_set_hash_net", "ip_set_hash_ipport", "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet", "ip_set_hash_netport", "ip_set_bitmap_port", "ip_set_list_set",
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_lc",
    # tc: qdiscs, classifiers, actions (bandwidth CNI, netem, eBPF datapaths)
    "sch_htb", "sch_ingress", "sch_netem", "sch_tbf", "sch_prio", "sch_sfq", "sch_fq", "sch_cake",
    "cls_u32", "cls_bpf", "cls_flower", "cls_matchall", "cls_fw", "cls_basic", "cls_cgroup",
    "act_mirred", "act_bpf", "act_gact", "act_police", "act_skbedit", "act_pedit", "act_csum",
    "act_vlan", "act_tunnel_key",
    # block devices and file systems (overlay and fuse are already in MODULES)
    "loop", "squashfs", "ext4", "xfs", "binfmt_misc",
)  # fmt: skip

# Where the base layer keeps the rootfs's /lib/modules/<kver> until the rootfs exists.
ROOTFS_MODULES_DIR = "rootfs-modules"
# depmod's inputs besides the modules: the order, and what is built in (`modprobe` of a built-in
# module succeeds; its aliases resolve).
_INDEX_INPUTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")

_XZ_MAGIC = b"\xfd7zXZ\x00"
# Compressed like the kernel's own `make modules_install` (xz --check=crc32 --lzma2=dict=1MiB):
# the guest's kmod (+XZ) decompresses when it loads one; a small dictionary keeps that cheap.
_MODULE_XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}]


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


def parse_show_depends(out: str, base: Path) -> list[str]:
    """`modprobe --show-depends` output → module files relative to base, in insmod order, each once.

    Raises RuntimeError on a line that is neither `insmod <path> [options]` nor `builtin <name>`
    (an `install` command from some modprobe.d would mean the list is not what the kernel loads).
    """
    order: list[str] = []
    for line in out.splitlines():
        words = line.split()
        if not words or words[0] == "builtin":
            continue  # built into the kernel: nothing to load
        if words[0] != "insmod" or len(words) < 2:
            raise RuntimeError(f"unexpected modprobe output: {line}")
        try:
            rel = str(Path(words[1]).relative_to(base))
        except ValueError:
            raise RuntimeError(f"modprobe names a module outside {base}: {line}") from None
        if rel not in order:
            order.append(rel)
    return order


def module_order(pkg_root: Path, kver: str, modules: tuple[str, ...]) -> list[str]:
    """Module files (relative to lib/modules/<kver>) in insmod order, each once."""
    # -C /dev/null: the host's modprobe.d (options, install commands, blacklists) is not the guest's
    out = run(
        ["modprobe", "-C", "/dev/null", "-a", "-d", pkg_root, "-S", kver, "--show-depends", *modules],
        capture=True,
    )
    return parse_show_depends(out, pkg_root / "lib/modules" / kver)


def compress_module(data: bytes) -> bytes:
    """A module as kmod reads `<name>.ko.xz`."""
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=_MODULE_XZ_FILTERS)


@dataclass(frozen=True)
class KernelBuild:
    initrd: list[str]  # module files the initrd insmods, in order
    rootfs: list[str]  # every module file the rootfs gets (initrd's included: depmod needs them)


def rootfs_modules_dir(rootfs: Path, kver: str) -> Path:
    """rootfs's /lib/modules/<kver>, through bookworm's merged /usr (lib -> usr/lib) when it is one."""
    lib = rootfs / "lib"
    if lib.is_symlink():  # taken inside rootfs, even if absolute
        lib = rootfs / os.readlink(lib).lstrip("/")
    return lib / "modules" / kver


def install_modules(base: Path, rootfs: Path, kver: str) -> None:
    """Move the base layer's module tree into rootfs and index it with the guest's own depmod (its
    modprobe reads what its kmod wrote), then check that the guest's modprobe resolves every
    on-demand module."""
    target = rootfs_modules_dir(rootfs, kver)
    target.parent.mkdir(parents=True, exist_ok=True)
    (base / ROOTFS_MODULES_DIR).rename(target)
    run(["chroot", rootfs, "depmod", kver])
    run(["chroot", rootfs, "modprobe", "-a", "-S", kver, "--show-depends", *ON_DEMAND_MODULES], capture=True)
    log(
        f"rootfs modules: {sum(p.stat().st_size for p in target.rglob('*') if p.is_file())} bytes in {target}"
    )


def build(kpkg: KernelPackage, dest: Path) -> KernelBuild:
    """Write dest/vmlinux, dest/modules/<rel>.ko and dest/modules.load (the initrd's), and
    dest/rootfs-modules/ (every module, xz-compressed, for install_modules)."""
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
        src = pkg_root / "lib/modules" / kpkg.kver
        everything = module_order(pkg_root, kpkg.kver, MODULES + ON_DEMAND_MODULES)
        tree = dest / ROOTFS_MODULES_DIR
        for rel in everything:
            target = tree / f"{rel}.xz"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(compress_module((src / rel).read_bytes()))
        for name in _INDEX_INPUTS:
            shutil.copy2(src / name, tree / name)
    log(
        f"kernel {kpkg.kver}: vmlinux {(dest / 'vmlinux').stat().st_size} bytes, {len(order)} initrd modules, "
        f"{len(everything)} in the rootfs"
    )
    return KernelBuild(order, everything)
