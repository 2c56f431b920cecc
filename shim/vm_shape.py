"""The VM a sandbox boots, as a value: configuration + sandbox id + guest image -> VmConfig.

One shape for everyone who needs it: the sandbox boots it, the pool restores clones of it (and must
name the same template key as the shim that asks), `kata-py template build` and `kata-py check`
compute its template key. None of them needs a sandbox object for that. `vm_config` is pure; the
two things it depends on that live on the host are read by the callers at their edge: the guest
image (find_guest: the files there, the kernel arguments its build wrote) and whether the host has
vhost-vsock (agent_client.transport.vsock_available).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from vmm.config import (
    DEFAULT_KERNEL_PARAMS,
    MachineType,
    MemoryHotplug,
    NinePShare,
    SerialChannel,
    VmConfig,
    VsockChannel,
)
from vmm.vsock import guest_cid

from .annotations import GuestAssets
from .config import Config
from .errors import FailedPrecondition
from .layout import sandbox_state_dir
from .share import GuestShare

GUEST_FILES = ("vmlinux", "initrd.img", "rootfs.erofs")
CMDLINE_FILE = "cmdline"  # the kernel arguments the guest build knows its initrd and kernel need


@dataclass(frozen=True)
class Guest:
    """A guest image directory with every boot file present, and its build's kernel arguments."""

    dir: Path
    kernel_params: tuple[str, ...] = DEFAULT_KERNEL_PARAMS


def find_guest(config: Config) -> Guest:
    """The configured guest image (resolved). Raises FailedPrecondition naming what is missing."""
    guest = config.guest_dir()
    missing = [f for f in GUEST_FILES if not (guest / f).is_file()]
    if missing:
        raise FailedPrecondition(
            f"guest image not built: {', '.join(missing)} missing in {guest} "
            "(build it with `python3 packaging/guest/build_guest.py`)")
    try:
        return read_guest(guest.resolve())
    except OSError as exc:
        raise FailedPrecondition(f"guest image {guest}: {exc}") from exc


def read_guest(directory: Path) -> Guest:
    """The guest image in `directory` as it is (no check of its files: `kata-py check` reports
    those). Raises OSError when its cmdline file cannot be read."""
    cmdline = directory / CMDLINE_FILE
    params = tuple(cmdline.read_text().split()) if cmdline.is_file() else DEFAULT_KERNEL_PARAMS
    return Guest(directory, params)


def agent_over_vsock(config: Config, host_has_vsock: bool) -> bool:
    """Whether the agent channel is vsock (config [agent] channel; `auto` picks virtio-serial wherever
    templates or the pool are on, since a vsock VM cannot be templated). Raises FailedPrecondition
    when vsock is asked for on a host without vhost-vsock."""
    channel = config.agent.channel
    if channel == "vsock" and not host_has_vsock:
        raise FailedPrecondition("config [agent] channel = \"vsock\", but this host has no /dev/vhost-vsock")
    if channel == "auto":
        return host_has_vsock and not (config.factory.template or config.factory.pool_socket)
    return channel == "vsock"


def vm_config(config: Config, sandbox_id: str, guest: Guest, *, vsock: bool, state_dir: Path | None = None,
              assets: GuestAssets | None = None) -> VmConfig:
    """The VM of sandbox `sandbox_id`: `guest`'s files unless `assets` (checked annotations) replace
    them; its agent over vsock (a CID derived from the id) when `vsock`, else over virtio-serial;
    its files in `state_dir` (default: the sandbox's state dir, shim/layout.py). Pure."""
    h = config.hypervisor
    assets = assets or GuestAssets()
    state = state_dir if state_dir is not None else sandbox_state_dir(config.runtime.state_dir, sandbox_id)
    # vmm adds the agent channel and log level keys to the kernel command line itself
    # the configuration holds strings: load_config checks memory_hotplug's, an unknown machine is
    # QEMU's to refuse (the configuration's types stay plain TOML values)
    machine, hotplug = cast(MachineType, h.machine), cast(MemoryHotplug, h.memory_hotplug)
    channel: SerialChannel | VsockChannel = (
        VsockChannel(guest_cid=guest_cid(sandbox_id)) if vsock else SerialChannel())
    return VmConfig(
        state_dir=state, kernel=assets.kernel or guest.dir / "vmlinux",
        initrd=assets.initrd or guest.dir / "initrd.img", rootfs=assets.image or guest.dir / "rootfs.erofs",
        kernel_params=guest.kernel_params, kernel_params_extra=tuple(h.kernel_params.split()),
        guest_log_level="debug" if config.runtime.debug else "info", name=f"kata-py-{sandbox_id[:16]}",
        machine=machine, vcpus=h.default_vcpus, max_vcpus=h.max_vcpus, memory_mib=h.default_memory_mib,
        max_memory_mib=h.max_memory_mib, memory_slots=h.memory_slots, memory_hotplug=hotplug,
        tb_size_mib=h.tb_size_mib, tcg_multithread=h.tcg_multithread, agent=channel,
        shared=NinePShare(GuestShare(state).exported))
