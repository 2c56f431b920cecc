"""VmConfig: everything needed to build one QEMU command line, as plain data.

Paths for the per-VM sockets and logs derive from ``state_dir`` (docs/architecture.md, "Host state
layout") unless given explicitly. ``validate()`` rejects combinations QEMU would refuse or that would
misbehave silently; it is called by the command-line builder.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vmm.errors import InvalidVmConfig

MemoryHotplug = Literal["pc-dimm", "virtio-mem"]
MachineType = Literal["q35", "microvm"]

# Guest memory blocks on x86-64 are 128 MiB: smaller DIMMs leave memory the guest cannot online.
MEMORY_BLOCK_MIB = 128
# Longest path a unix socket address can hold (sun_path is 108 bytes incl. the NUL).
MAX_SOCKET_PATH = 107
SHARED_MOUNT_TAG = "kataShared"
# Guest CIDs a VM can have: 0-2 are reserved (hypervisor, local, host), 2**32 - 1 is VMADDR_CID_ANY.
VSOCK_CID_MIN = 3
VSOCK_CID_MAX = 2**32 - 2

# Boot parameters every guest gets. Why: quiet serial console; panic/reboot make QEMU exit
# (with -no-reboot) instead of hanging; the rest trims TCG boot time (probes we do not need).
DEFAULT_KERNEL_PARAMS: tuple[str, ...] = (
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "reboot=t",
    "tsc=reliable",
    "no_timer_check",
    "noreplace-smp",
    "rcupdate.rcu_expedited=1",
    "i8042.noaux",
    "i8042.nokbd",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "cryptomgr.notests",
    "rdinit=/init",  # the initrd's /init mounts the erofs root itself
)


@dataclass(frozen=True)
class SerialChannel:
    """Agent over a virtio-serial port named ``agent``; host end is a unix socket QEMU listens on."""

    socket_path: Path | None = None  # default: <state_dir>/agent.sock

    def socket_in(self, state_dir: Path) -> Path:
        return self.socket_path or state_dir / "agent.sock"


@dataclass(frozen=True)
class VsockChannel:
    """Agent over vhost-vsock; the guest listens on ``port``.

    The agent serves only connections that start with the sandbox's token (vmm/vsock.py): QEMU
    hands the guest ``token_file`` (default <state_dir>/agent-token) as an fw_cfg file.
    """

    guest_cid: int
    port: int = 1024
    token_file: Path | None = None

    def token_file_in(self, state_dir: Path) -> Path:
        return self.token_file or state_dir / "agent-token"


AgentChannel = SerialChannel | VsockChannel


@dataclass(frozen=True)
class NinePShare:
    """Host directory exported with virtio-9p under the mount tag kataShared."""

    path: Path


@dataclass(frozen=True)
class VirtioFsShare:
    """A running virtiofsd's vhost-user socket; needs guest RAM shared with it."""

    socket_path: Path


SharedDir = NinePShare | VirtioFsShare


@dataclass(frozen=True)
class RamFile:
    """Guest RAM backed by a file (memory-backend-file), for VM templates.

    A template maps it with ``share=True`` (its RAM *is* the file); a clone maps the same file with
    ``share=False`` (private copy-on-write, the file is never written).
    """

    path: Path
    share: bool


@dataclass(frozen=True)
class VmConfig:
    state_dir: Path
    kernel: Path | None = None  # None: no guest (tests run QEMU paused with -S)
    initrd: Path | None = None
    rootfs: Path | None = None  # read-only raw image, first virtio-blk disk (/dev/vda)
    kernel_params: tuple[str, ...] = DEFAULT_KERNEL_PARAMS
    kernel_params_extra: tuple[str, ...] = ()
    guest_log_level: Literal["debug", "info"] = "info"
    name: str = "kata-py"

    machine: MachineType = "q35"
    cpu_model: str | None = None  # None: "max" under TCG, "host" under KVM
    vcpus: int = 1
    max_vcpus: int = 4
    memory_mib: int = 512
    max_memory_mib: int = 4096
    memory_slots: int = 4
    memory_hotplug: MemoryHotplug = "pc-dimm"
    virtio_mem_block_mib: int = 2
    tb_size_mib: int = 64  # TCG translation buffer: the 1 GiB default fills up (guest-notes)
    # Multi-threaded TCG gives each vCPU a slice of the translation buffer; QEMU 7.2 aborts
    # (tcg_region_initial_alloc__locked: assertion failed) when a vCPU is hot-plugged after the
    # slices ran out, which template clones reach quickly. Single-threaded TCG has no slices.
    tcg_multithread: bool = False

    agent: AgentChannel = field(default_factory=SerialChannel)
    shared: SharedDir | None = None
    console_log: Path | None = None  # default: <state_dir>/console.log
    vmgenid: uuid.UUID = field(default_factory=uuid.uuid4)  # new per clone: the guest sees a "fork"

    # Empty PCIe root ports (q35 only) that NICs are hot-plugged onto: q35 cannot hot-plug onto pcie.0.
    # Part of the device set, so a template and its clones must agree on it.
    pcie_root_ports: int = 2

    ram_file: RamFile | None = None
    incoming_defer: bool = False  # -incoming defer: wait for migrate-incoming (snapshot restore)
    start_paused: bool = False  # -S

    # ---- derived paths -------------------------------------------------------------------------
    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path | None:
        if isinstance(self.agent, SerialChannel):
            return self.agent.socket_in(self.state_dir)
        return None

    @property
    def agent_token_file(self) -> Path | None:
        if isinstance(self.agent, VsockChannel):
            return self.agent.token_file_in(self.state_dir)
        return None

    @property
    def console_path(self) -> Path:
        return self.console_log or self.state_dir / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "qemu.pid"

    @property
    def memory_hotpluggable(self) -> bool:
        return self.max_memory_mib > self.memory_mib

    def validate(self) -> None:
        """Raises InvalidVmConfig describing the first problem found."""
        problems = list(_problems(self))
        if problems:
            raise InvalidVmConfig("invalid VM config: " + "; ".join(problems))


def _problems(cfg: VmConfig) -> Iterator[str]:
    if not 1 <= cfg.vcpus <= cfg.max_vcpus:
        yield f"vcpus must be in 1..max_vcpus ({cfg.vcpus} / {cfg.max_vcpus})"
    if cfg.memory_mib < 64:
        yield f"memory_mib {cfg.memory_mib} is below 64"
    if cfg.max_memory_mib < cfg.memory_mib:
        yield f"max_memory_mib {cfg.max_memory_mib} < memory_mib {cfg.memory_mib}"
    if cfg.memory_hotpluggable and cfg.memory_hotplug == "pc-dimm" and cfg.memory_slots < 1:
        yield "pc-dimm memory hotplug needs memory_slots >= 1"
    if cfg.memory_hotplug == "virtio-mem" and cfg.memory_hotpluggable:
        room = cfg.max_memory_mib - cfg.memory_mib
        if cfg.virtio_mem_block_mib < 2 or room % cfg.virtio_mem_block_mib:
            yield f"virtio-mem size {room} MiB is not a multiple of block size {cfg.virtio_mem_block_mib} MiB"
    if cfg.machine == "microvm" and (cfg.max_vcpus > cfg.vcpus or cfg.memory_hotpluggable):
        yield "microvm has no hotplug: set max_vcpus == vcpus and max_memory_mib == memory_mib"
    if not 0 <= cfg.pcie_root_ports <= 16:
        yield f"pcie_root_ports must be in 0..16 ({cfg.pcie_root_ports})"
    if cfg.tb_size_mib < 1:
        yield "tb_size_mib must be positive"
    if cfg.initrd is not None and cfg.kernel is None:
        yield "initrd given without a kernel"
    if isinstance(cfg.agent, VsockChannel) and not VSOCK_CID_MIN <= cfg.agent.guest_cid <= VSOCK_CID_MAX:
        yield f"vsock guest cid {cfg.agent.guest_cid} is reserved (must be in {VSOCK_CID_MIN}..{VSOCK_CID_MAX})"
    if isinstance(cfg.shared, VirtioFsShare) and cfg.ram_file is not None and not cfg.ram_file.share:
        yield "virtio-fs needs guest RAM shared with virtiofsd, but ram_file.share is False"
    if cfg.incoming_defer and cfg.start_paused:
        yield "incoming_defer already keeps the VM paused; do not combine with start_paused"
    for sock in (cfg.qmp_socket, cfg.agent_socket):
        if sock is not None and len(str(sock)) > MAX_SOCKET_PATH:
            yield f"socket path too long for AF_UNIX ({len(str(sock))} > {MAX_SOCKET_PATH}): {sock}"
