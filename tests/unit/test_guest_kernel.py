"""The guest build's module logic (packaging/guest/guest_kernel.py): which files modprobe names, how
they are compressed for the guest's kmod, where the rootfs keeps them. Pure; no kernel package."""

from __future__ import annotations

import importlib
import lzma
import sys
from pathlib import Path
from types import ModuleType

import pytest

GUEST_DIR = Path(__file__).resolve().parents[2] / "packaging" / "guest"
BASE = Path("/tmp/pkg/lib/modules/6.1.0-57-amd64")


@pytest.fixture(scope="module")
def gk() -> ModuleType:
    # packaging/guest is a directory of scripts whose modules import each other by bare name
    sys.path.insert(0, str(GUEST_DIR))
    try:
        return importlib.import_module("guest_kernel")
    finally:
        sys.path.remove(str(GUEST_DIR))


def test_show_depends_gives_files_in_load_order_once(gk: ModuleType) -> None:
    out = (
        f"insmod {BASE}/kernel/net/802/stp.ko \n"
        f"insmod {BASE}/kernel/net/llc/llc.ko \n"
        "builtin sch_fq_codel\n"
        f"insmod {BASE}/kernel/net/bridge/bridge.ko \n"
        f"insmod {BASE}/kernel/net/llc/llc.ko \n"  # a dependency of two requested modules
        f"insmod {BASE}/kernel/drivers/net/bonding/bonding.ko max_bonds=0\n"  # options are modprobe.d's
        "\n"
    )
    assert gk.parse_show_depends(out, BASE) == [
        "kernel/net/802/stp.ko",
        "kernel/net/llc/llc.ko",
        "kernel/net/bridge/bridge.ko",
        "kernel/drivers/net/bonding/bonding.ko",
    ]


@pytest.mark.parametrize(
    "line",
    [
        "install /bin/true",  # an install command: not what the kernel would load
        "insmod",
        "insmod /elsewhere/kernel/net/bridge/bridge.ko",  # outside the package's module tree
    ],
)
def test_show_depends_refuses_what_it_cannot_copy(gk: ModuleType, line: str) -> None:
    with pytest.raises(RuntimeError):
        gk.parse_show_depends(f"insmod {BASE}/kernel/net/llc/llc.ko\n{line}\n", BASE)


def test_compressed_module_is_xz_that_kmod_and_the_kernel_read(gk: ModuleType) -> None:
    data = bytes(range(256)) * 4096 + b"\x7fELF tail"
    packed = gk.compress_module(data)
    assert lzma.decompress(packed, format=lzma.FORMAT_XZ) == data
    assert len(packed) < len(data) // 10
    # stream header: magic, then flags whose check type is CRC32 (1), as `make modules_install` writes
    assert packed[:6] == b"\xfd7zXZ\x00"
    assert packed[7] == lzma.CHECK_CRC32
    # the LZMA2 filter's dictionary (1 MiB) bounds the memory the guest needs to decompress one
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=2 << 20)
    assert dec.decompress(packed) == data


def test_rootfs_modules_dir_follows_merged_usr_inside_the_rootfs(gk: ModuleType, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    (merged / "usr/lib").mkdir(parents=True)
    (merged / "lib").symlink_to("usr/lib")
    assert gk.rootfs_modules_dir(merged, "6.1.0-57-amd64") == merged / "usr/lib/modules/6.1.0-57-amd64"
    absolute = tmp_path / "absolute"
    absolute.mkdir()
    (absolute / "lib").symlink_to("/usr/lib")  # must not lead to the build host's /usr/lib
    assert gk.rootfs_modules_dir(absolute, "k") == absolute / "usr/lib/modules/k"
    plain = tmp_path / "plain"
    (plain / "lib").mkdir(parents=True)
    assert gk.rootfs_modules_dir(plain, "k") == plain / "lib/modules/k"


def test_module_lists_name_each_module_once(gk: ModuleType) -> None:
    both = gk.MODULES + gk.ON_DEMAND_MODULES
    assert len(set(both)) == len(both), [m for m in both if both.count(m) > 1]
    # what the conformance spec and the e2e test rely on
    assert {"bridge", "veth", "vxlan", "nf_tables", "ip_tables", "loop", "tun"} <= set(gk.ON_DEMAND_MODULES)
