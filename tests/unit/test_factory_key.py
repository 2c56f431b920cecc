"""Template keys (issue #9): what must match between a template and its clones changes the key;
per-VM backends do not."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest

from shim.factory.key import NoTemplate, guest_image_hash, template_key
from vmm.accel import AccelChoice
from vmm.config import NinePShare, VmConfig, VsockChannel

TCG = AccelChoice("tcg", "test")
KVM = AccelChoice("kvm", "test")


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    g = tmp_path / "guest"
    g.mkdir()
    for name in ("vmlinux", "initrd.img", "rootfs.erofs"):
        (g / name).write_bytes(b"x")
    (g / "manifest.json").write_text(json.dumps({"hash": "aaaa"}))
    return g


def vm(guest: Path, state: Path, **kw) -> VmConfig:
    return VmConfig(state_dir=state, kernel=guest / "vmlinux", initrd=guest / "initrd.img",
                    rootfs=guest / "rootfs.erofs", shared=NinePShare(state / "shared"), **kw)


def key(cfg: VmConfig, accel: AccelChoice = TCG, qemu: str = "QEMU 7.2") -> str:
    return template_key(cfg, accel, guest_image_hash(cfg), qemu)


def test_per_vm_backends_do_not_change_the_key(guest: Path, tmp_path: Path):
    a = vm(guest, tmp_path / "a", name="kata-py-a")
    b = vm(guest, tmp_path / "b", name="kata-py-b", vmgenid=uuid.uuid4())
    assert key(a) == key(b)


@pytest.mark.parametrize("change", [
    {"memory_mib": 1024}, {"max_vcpus": 8}, {"vcpus": 2}, {"max_memory_mib": 8192}, {"machine": "microvm",
     "max_vcpus": 1, "max_memory_mib": 512}, {"kernel_params_extra": ("foo=1",)}, {"guest_log_level": "debug"},
    {"tb_size_mib": 32}, {"shared": None}, {"memory_hotplug": "virtio-mem"},
])
def test_what_a_clone_must_match_changes_the_key(guest: Path, tmp_path: Path, change: dict):
    base = vm(guest, tmp_path / "s")
    assert key(base) != key(dataclasses.replace(base, **change))


def test_accelerator_and_qemu_version_change_the_key(guest: Path, tmp_path: Path):
    cfg = vm(guest, tmp_path / "s")
    assert len({key(cfg), key(cfg, accel=KVM), key(cfg, qemu="QEMU 8.0")}) == 3


def test_a_rebuilt_guest_image_changes_the_key(guest: Path, tmp_path: Path):
    cfg = vm(guest, tmp_path / "s")
    before = key(cfg)
    (guest / "manifest.json").write_text(json.dumps({"hash": "bbbb"}))
    assert key(cfg) != before


def test_guest_files_without_a_manifest_are_keyed_by_size_and_mtime(guest: Path, tmp_path: Path):
    (guest / "manifest.json").unlink()
    cfg = vm(guest, tmp_path / "s")
    before = key(cfg)
    (guest / "rootfs.erofs").write_bytes(b"longer")
    assert key(cfg) != before


def test_vsock_vms_cannot_be_templated(guest: Path, tmp_path: Path):
    with pytest.raises(NoTemplate):
        key(vm(guest, tmp_path / "s", agent=VsockChannel(guest_cid=7)))
