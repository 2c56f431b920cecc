"""Accelerator choice: KVM when it is real and usable, TCG otherwise.

Probing (opening /dev/kvm, an ioctl, looking at /sys/module) is kept apart from the decision
(`choose_accel`), which is pure so it can be tested with made-up probe results.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmm.errors import AccelUnavailable

AccelName = Literal["kvm", "tcg"]
AccelRequest = Literal["auto", "kvm", "tcg"]

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO=0xAE, 0x00)
KVM_API_VERSION = 12  # stable since Linux 2.6.22; anything else is not a KVM we know


@dataclass(frozen=True)
class KvmProbe:
    """What the host told us about /dev/kvm. ``error`` explains the first thing that failed."""

    opens: bool
    api_version: int | None
    pvm: bool
    error: str = ""


@dataclass(frozen=True)
class AccelChoice:
    name: AccelName
    reason: str


def choose_accel(requested: AccelRequest, probe: KvmProbe) -> AccelChoice:
    """Pure decision from a probe result.

    Raises AccelUnavailable if "kvm" was requested and the probe says it is unusable, and
    ValueError for an unknown request.
    """
    if requested == "tcg":
        return AccelChoice("tcg", "tcg requested")
    if requested not in ("auto", "kvm"):
        raise ValueError(f"unknown accelerator {requested!r}: expected auto, kvm or tcg")
    problem = _kvm_problem(probe)
    if problem is None:
        return AccelChoice("kvm", f"/dev/kvm usable (API version {probe.api_version})")
    if requested == "kvm":
        raise AccelUnavailable(f"kvm requested but unusable: {problem}")
    return AccelChoice("tcg", problem)


def _kvm_problem(probe: KvmProbe) -> str | None:
    if not probe.opens:
        return f"/dev/kvm cannot be opened: {probe.error or 'unknown error'}"
    if probe.pvm:
        # kvm_pvm is a paravirtual KVM for nested guests: stock kernels hang early on it.
        return "kvm_pvm detected: stock guest kernels do not boot on it"
    if probe.api_version != KVM_API_VERSION:
        return f"KVM_GET_API_VERSION returned {probe.api_version!r} ({probe.error or 'expected 12'})"
    return None


def probe_kvm(dev: str = "/dev/kvm", sys_module: str = "/sys/module") -> KvmProbe:
    """Look at the host's KVM. Never raises: failures are recorded in the probe."""
    pvm = (Path(sys_module) / "kvm_pvm").exists() or _misc_driver_is_pvm(dev)
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmProbe(opens=False, api_version=None, pvm=pvm, error=str(e))
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return KvmProbe(opens=True, api_version=None, pvm=pvm, error=f"ioctl failed: {e}")
    finally:
        os.close(fd)
    return KvmProbe(opens=True, api_version=version, pvm=pvm)


def _misc_driver_is_pvm(dev: str) -> bool:
    # Where the module is built in there is no /sys/module/kvm_pvm dir with a holder; the misc
    # device's driver link (when present) still names it.
    name = Path(dev).name
    try:
        return "pvm" in os.path.basename(os.readlink(f"/sys/class/misc/{name}/device/driver"))
    except OSError:
        return False


def detect_accel(requested: AccelRequest = "auto") -> AccelChoice:
    """Probe the host and choose. Raises AccelUnavailable when "kvm" is requested but unusable."""
    if requested == "tcg":
        return choose_accel("tcg", KvmProbe(opens=False, api_version=None, pvm=False))
    return choose_accel(requested, probe_kvm())
