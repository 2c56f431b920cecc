"""build_template's errors come out as its docstring names them (not as a trio >= 0.25 group of one),
so the sandbox and the pool, which catch VmmError/OSError/TooSlowError, log them and boot cold."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from shim.factory import template
from shim.factory.store import TemplateStore
from vmm.accel import detect_accel
from vmm.config import NinePShare, VmConfig
from vmm.errors import VmStartError
from vmm.qemu import QemuHypervisor


async def test_a_failed_boot_is_a_bare_vm_start_error_and_commits_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guest = tmp_path / "guest"
    guest.mkdir()
    for name in ("vmlinux", "initrd.img", "rootfs.erofs"):
        (guest / name).write_bytes(b"x")
    cfg = VmConfig(state_dir=tmp_path / "vm", kernel=guest / "vmlinux", initrd=guest / "initrd.img",
                   rootfs=guest / "rootfs.erofs", shared=NinePShare(tmp_path / "vm" / "shared"))
    # the real QemuHypervisor, with a QEMU binary that does not exist: start() raises VmStartError
    monkeypatch.setattr(template, "QemuHypervisor",
                        functools.partial(QemuHypervisor, qemu_binary=str(tmp_path / "no-qemu")))
    store = TemplateStore(tmp_path / "templates")
    with pytest.raises(VmStartError, match="cannot run"):
        await template.build_template(store, "k" * 16, cfg, detect_accel("tcg"), work_dir=tmp_path / "work",
                                      timeout=10)
    assert store.lookup("k" * 16) is None
    assert not (tmp_path / "work").exists()
    assert not store.root.exists() or not any(store.root.iterdir()), "staging dir left behind"
