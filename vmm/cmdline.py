"""Pure translation VmConfig + AccelChoice -> QEMU argv (no I/O, no defaults looked up at run time).

Device set and order follow the guest contract in docs/architecture.md. Order matters beyond taste:
the rootfs must be the first virtio-blk disk (/dev/vda), and a snapshot can only be restored into a
QEMU with the same devices in the same order, so nothing here depends on host state.
"""

from __future__ import annotations

from pathlib import Path

from vmm.accel import AccelChoice
from vmm.config import (
    SHARED_MOUNT_TAG,
    NinePShare,
    SerialChannel,
    VirtioFsShare,
    VmConfig,
    VsockChannel,
)

AGENT_PORT_NAME = "agent"  # the guest finds the port by this name
AGENT_PORT_ID = "agentport"  # VSERPORT_CHANGE reports this id
AGENT_CHARDEV_ID = "agentchr"
AGENT_TOKEN_FW_CFG = "opt/io.kata-py/agent-token"  # the guest reads /sys/firmware/qemu_fw_cfg/by_name/<this>/raw
VIRTIO_MEM_ID = "vm0"
RAM_BACKEND_ID = "pc.ram"
ROOT_PORT_PREFIX = "rp"  # pcie-root-port ids: rp0, rp1, ... (hot-plug targets for NICs)
# QEMU's own seccomp filter: no exec/fork of helpers (migration goes through passed fds, taps come
# as fds), no setuid/setgid family, no scheduler/affinity/priority changes, no obsolete syscalls.
# It stacks with the filter vmm/confine.py installs before exec.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def root_port_ids(cfg: VmConfig) -> list[str]:
    """Ids of the empty PCIe root ports build_argv creates (none on microvm)."""
    if cfg.machine != "q35":
        return []
    return [f"{ROOT_PORT_PREFIX}{i}" for i in range(cfg.pcie_root_ports)]


def opt(value: str | Path) -> str:
    """Escape a value for QEMU's key=value,... option syntax (a literal comma is written twice)."""
    return str(value).replace(",", ",,")


def kernel_cmdline(cfg: VmConfig) -> str:
    """The guest kernel command line: base params, the keys the agent reads, then extras."""
    params = list(cfg.kernel_params)
    if isinstance(cfg.agent, VsockChannel):
        params.append(f"kata_py.channel=vsock:{cfg.agent.port}")
    else:
        params.append(f"kata_py.channel=serial:{AGENT_PORT_NAME}")
    params.append(f"kata_py.log={cfg.guest_log_level}")
    if cfg.memory_hotpluggable:
        # Without this hot-added blocks stay offline; movable so they can be unplugged again.
        params.append("memhp_default_state=online_movable")
    params.extend(cfg.kernel_params_extra)  # last, so they override
    return " ".join(params)


def build_argv(cfg: VmConfig, accel: AccelChoice, qemu_binary: str = "qemu-system-x86_64") -> list[str]:
    """Build the full QEMU argv. Raises InvalidVmConfig (from cfg.validate()) for unusable configs."""
    cfg.validate()
    bus = "device" if cfg.machine == "microvm" else "pci"  # microvm has virtio-mmio only

    argv = [qemu_binary, "-name", f"{opt(cfg.name)},debug-threads=on"]
    argv += ["-machine", _machine(cfg), "-accel", _accel(cfg, accel), "-cpu", _cpu(cfg, accel)]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += ["-sandbox", QEMU_SANDBOX]
    argv += ["-smp", f"{cfg.vcpus},maxcpus={cfg.max_vcpus}"]
    argv += ["-m", _memory(cfg)]
    if cfg.ram_file is not None:
        share = "on" if cfg.ram_file.share else "off"
        argv += ["-object", f"memory-backend-file,id={RAM_BACKEND_ID},size={cfg.memory_mib}M,"
                            f"mem-path={opt(cfg.ram_file.path)},share={share}"]
    elif isinstance(cfg.shared, VirtioFsShare):
        # virtiofsd must see guest RAM: back it with a shared memfd.
        argv += ["-object", f"memory-backend-memfd,id={RAM_BACKEND_ID},size={cfg.memory_mib}M,share=on"]

    argv += ["-chardev", f"file,id=console0,path={opt(cfg.console_path)},append=on",
             "-serial", "chardev:console0"]
    argv += ["-qmp", f"unix:{opt(cfg.qmp_socket)},server=on,wait=off"]
    argv += ["-pidfile", str(cfg.pid_file)]

    if cfg.kernel is not None:
        argv += ["-kernel", str(cfg.kernel), "-append", kernel_cmdline(cfg)]
        if cfg.initrd is not None:
            argv += ["-initrd", str(cfg.initrd)]

    if cfg.rootfs is not None:
        argv += ["-drive", f"file={opt(cfg.rootfs)},if=none,id=rootfs,format=raw,readonly=on",
                 "-device", f"virtio-blk-{bus},drive=rootfs"]
    argv += _agent_devices(cfg, bus)
    argv += _shared_devices(cfg, bus)
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", f"virtio-rng-{bus},rng=rng0"]
    argv += ["-device", f"vmgenid,guid={cfg.vmgenid}"]
    if cfg.memory_hotplug == "virtio-mem" and cfg.memory_hotpluggable:
        # Cold-plugged: q35's root bus cannot hot-add it (protocols.md §7); resized via qom-set.
        size = cfg.max_memory_mib - cfg.memory_mib
        argv += ["-object", f"memory-backend-ram,id=vmem0,size={size}M",
                 "-device", f"virtio-mem-{bus},id={VIRTIO_MEM_ID},memdev=vmem0,requested-size=0,"
                            f"block-size={cfg.virtio_mem_block_mib}M"]
    for i, port in enumerate(root_port_ids(cfg)):
        argv += ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    if cfg.start_paused:
        argv.append("-S")
    if cfg.incoming_defer:
        argv += ["-incoming", "defer"]
    return argv


def _machine(cfg: VmConfig) -> str:
    parts: list[str] = [cfg.machine]
    if cfg.ram_file is not None or isinstance(cfg.shared, VirtioFsShare):
        parts.append(f"memory-backend={RAM_BACKEND_ID}")
    return ",".join(parts)


def _accel(cfg: VmConfig, accel: AccelChoice) -> str:
    if accel.name == "kvm":
        return "kvm"
    return f"tcg,thread={'multi' if cfg.tcg_multithread else 'single'},tb-size={cfg.tb_size_mib}"


def _cpu(cfg: VmConfig, accel: AccelChoice) -> str:
    if cfg.cpu_model:
        return cfg.cpu_model
    return "host" if accel.name == "kvm" else "max"


def _memory(cfg: VmConfig) -> str:
    if not cfg.memory_hotpluggable:
        return f"{cfg.memory_mib}M"
    if cfg.memory_hotplug == "pc-dimm":
        return f"{cfg.memory_mib}M,slots={cfg.memory_slots},maxmem={cfg.max_memory_mib}M"
    return f"{cfg.memory_mib}M,maxmem={cfg.max_memory_mib}M"  # virtio-mem needs no DIMM slots


def _agent_devices(cfg: VmConfig, bus: str) -> list[str]:
    if isinstance(cfg.agent, SerialChannel):
        sock = cfg.agent.socket_in(cfg.state_dir)
        return ["-device", f"virtio-serial-{bus},id=vser0",
                "-chardev", f"socket,id={AGENT_CHARDEV_ID},path={opt(sock)},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV_ID},"
                           f"name={AGENT_PORT_NAME},id={AGENT_PORT_ID}"]
    # The agent's token reaches the guest as an fw_cfg file: its path is on this (world-readable)
    # command line, its content only in the 0600 file and the guest (vmm/vsock.py).
    return ["-device", f"vhost-vsock-{bus},id=vsock0,guest-cid={cfg.agent.guest_cid}",
            "-fw_cfg", f"name={AGENT_TOKEN_FW_CFG},file={opt(cfg.agent.token_file_in(cfg.state_dir))}"]


def _shared_devices(cfg: VmConfig, bus: str) -> list[str]:
    if isinstance(cfg.shared, NinePShare):
        return ["-fsdev", f"local,id=fs0,path={opt(cfg.shared.path)},security_model=none,multidevs=remap",
                "-device", f"virtio-9p-{bus},fsdev=fs0,mount_tag={SHARED_MOUNT_TAG}"]
    if isinstance(cfg.shared, VirtioFsShare):
        return ["-chardev", f"socket,id=vfs0,path={opt(cfg.shared.socket_path)}",
                "-device", f"vhost-user-fs-{bus},chardev=vfs0,tag={SHARED_MOUNT_TAG}"]
    return []
