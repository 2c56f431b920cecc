"""Accelerator decision from made-up probe results (the probe itself is a thin I/O edge)."""

from __future__ import annotations

import pytest

from vmm.accel import AccelChoice, KvmProbe, choose_accel, detect_accel, probe_kvm
from vmm.errors import AccelUnavailable

GOOD = KvmProbe(opens=True, api_version=12, pvm=False)
PVM = KvmProbe(opens=True, api_version=12, pvm=True)
NO_DEV = KvmProbe(opens=False, api_version=None, pvm=False, error="No such file or directory")
BAD_IOCTL = KvmProbe(opens=True, api_version=None, pvm=False, error="ioctl failed: Inappropriate ioctl")


@pytest.mark.parametrize(
    ("requested", "probe", "name", "reason_part"),
    [
        ("auto", GOOD, "kvm", "API version 12"),
        ("auto", PVM, "tcg", "kvm_pvm detected: stock guest kernels do not boot on it"),
        ("auto", NO_DEV, "tcg", "cannot be opened: No such file"),
        ("auto", BAD_IOCTL, "tcg", "ioctl failed"),
        ("auto", KvmProbe(opens=True, api_version=11, pvm=False), "tcg", "returned 11"),
        ("kvm", GOOD, "kvm", "usable"),
        ("tcg", GOOD, "tcg", "tcg requested"),
        ("tcg", PVM, "tcg", "tcg requested"),
    ],
)
def test_choice(requested, probe, name, reason_part) -> None:
    choice = choose_accel(requested, probe)
    assert choice.name == name
    assert reason_part in choice.reason


@pytest.mark.parametrize("probe", [PVM, NO_DEV, BAD_IOCTL])
def test_kvm_requested_on_unusable_host_is_a_clear_error(probe) -> None:
    with pytest.raises(AccelUnavailable, match="kvm requested but unusable"):
        choose_accel("kvm", probe)


def test_unknown_request() -> None:
    with pytest.raises(ValueError, match="unknown accelerator"):
        choose_accel("hvf", GOOD)  # type: ignore[arg-type]


def test_probe_of_missing_device_does_not_raise(tmp_path) -> None:
    probe = probe_kvm(dev=str(tmp_path / "kvm"), sys_module=str(tmp_path))
    assert not probe.opens and probe.error


def test_probe_sees_kvm_pvm_module(tmp_path) -> None:
    (tmp_path / "kvm_pvm").mkdir()
    assert probe_kvm(dev=str(tmp_path / "kvm"), sys_module=str(tmp_path)).pvm


def test_detect_tcg_does_not_probe() -> None:
    assert detect_accel("tcg") == AccelChoice("tcg", "tcg requested")
