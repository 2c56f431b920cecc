"""VmConfig -> QEMU argv, table-driven. Each case states the option (and its value) it expects."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from vmm.accel import AccelChoice
from vmm.cmdline import build_argv, kernel_cmdline, opt
from vmm.config import NinePShare, RamFile, SerialChannel, VirtioFsShare, VmConfig, VsockChannel
from vmm.errors import InvalidVmConfig

TCG = AccelChoice("tcg", "test")
KVM = AccelChoice("kvm", "test")
S = Path("/run/kata-py/sandboxes/sb1")
GUID = uuid.UUID("12345678-1234-5678-1234-567812345678")
BASE = VmConfig(state_dir=S, kernel=Path("/g/vmlinux"), initrd=Path("/g/initrd.img"),
                rootfs=Path("/g/rootfs.erofs"), vmgenid=GUID)


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) pairs; flags without a value pair with ''."""
    out, i = [], 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out.append((argv[i], argv[i + 1]))
            i += 2
        else:
            out.append((argv[i], ""))
            i += 1
    return out


CASES = [
    # (id, config changes, accel, expected (option, value) pairs present)
    ("defaults", {}, TCG, [
        ("-machine", "q35"), ("-accel", "tcg,thread=single,tb-size=64"), ("-cpu", "max"),
        ("-nodefaults", ""), ("-no-user-config", ""), ("-display", "none"),
        ("-smp", "1,maxcpus=4"), ("-m", "512M,slots=4,maxmem=4096M"),
        ("-qmp", f"unix:{S}/qmp.sock,server=on,wait=off"),
        ("-chardev", f"file,id=console0,path={S}/console.log,append=on"), ("-serial", "chardev:console0"),
        ("-kernel", "/g/vmlinux"), ("-initrd", "/g/initrd.img"),
        ("-drive", "file=/g/rootfs.erofs,if=none,id=rootfs,format=raw,readonly=on"),
        ("-device", "virtio-blk-pci,drive=rootfs"),
        ("-device", "virtio-serial-pci,id=vser0"),
        ("-chardev", f"socket,id=agentchr,path={S}/agent.sock,server=on,wait=off"),
        ("-device", "virtserialport,bus=vser0.0,chardev=agentchr,name=agent,id=agentport"),
        ("-device", "virtio-rng-pci,rng=rng0"),
        ("-device", f"vmgenid,guid={GUID}"),
    ]),
    ("kvm uses host cpu", {}, KVM, [("-accel", "kvm"), ("-cpu", "host")]),
    ("explicit cpu and tb size", {"cpu_model": "qemu64", "tb_size_mib": 32}, TCG,
     [("-cpu", "qemu64"), ("-accel", "tcg,thread=single,tb-size=32")]),
    ("multi-threaded tcg on request", {"tcg_multithread": True}, TCG, [("-accel", "tcg,thread=multi,tb-size=64")]),
    ("vcpus", {"vcpus": 2, "max_vcpus": 8}, TCG, [("-smp", "2,maxcpus=8")]),
    ("no memory hotplug", {"max_memory_mib": 512}, TCG, [("-m", "512M")]),
    ("virtio-mem", {"memory_hotplug": "virtio-mem", "max_memory_mib": 2560}, TCG, [
        ("-m", "512M,maxmem=2560M"), ("-object", "memory-backend-ram,id=vmem0,size=2048M"),
        ("-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0,block-size=2M")]),
    ("vsock", {"agent": VsockChannel(guest_cid=7)}, TCG, [("-device", "vhost-vsock-pci,id=vsock0,guest-cid=7")]),
    ("serial socket elsewhere", {"agent": SerialChannel(Path("/tmp/a.sock"))}, TCG,
     [("-chardev", "socket,id=agentchr,path=/tmp/a.sock,server=on,wait=off")]),
    ("9p", {"shared": NinePShare(S / "shared")}, TCG, [
        ("-fsdev", f"local,id=fs0,path={S}/shared,security_model=none,multidevs=remap"),
        ("-device", "virtio-9p-pci,fsdev=fs0,mount_tag=kataShared")]),
    ("virtio-fs", {"shared": VirtioFsShare(Path("/run/vfs.sock"))}, TCG, [
        ("-machine", "q35,memory-backend=pc.ram"),
        ("-object", "memory-backend-memfd,id=pc.ram,size=512M,share=on"),
        ("-chardev", "socket,id=vfs0,path=/run/vfs.sock"),
        ("-device", "vhost-user-fs-pci,chardev=vfs0,tag=kataShared")]),
    ("template", {"ram_file": RamFile(Path("/dev/shm/t1"), share=True)}, TCG, [
        ("-machine", "q35,memory-backend=pc.ram"),
        ("-object", "memory-backend-file,id=pc.ram,size=512M,mem-path=/dev/shm/t1,share=on")]),
    ("clone", {"ram_file": RamFile(Path("/dev/shm/t1"), share=False), "incoming_defer": True}, TCG, [
        ("-object", "memory-backend-file,id=pc.ram,size=512M,mem-path=/dev/shm/t1,share=off"),
        ("-incoming", "defer")]),
    ("paused", {"start_paused": True}, TCG, [("-S", "")]),
    ("microvm", {"machine": "microvm", "max_vcpus": 1, "max_memory_mib": 512}, TCG, [
        ("-machine", "microvm"), ("-device", "virtio-blk-device,drive=rootfs"),
        ("-device", "virtio-serial-device,id=vser0")]),
    ("commas escaped", {"shared": NinePShare(Path("/a,b"))}, TCG,
     [("-fsdev", "local,id=fs0,path=/a,,b,security_model=none,multidevs=remap")]),
]


@pytest.mark.parametrize(("changes", "accel", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_argv_contains(changes, accel, expected) -> None:
    got = pairs(build_argv(replace(BASE, **changes), accel))
    for item in expected:
        assert item in got


@pytest.mark.parametrize(("changes", "absent"), [
    ({}, "-S"), ({}, "-incoming"), ({}, "vhost-vsock"), ({}, "virtio-mem"), ({}, "-fsdev"),
    ({"kernel": None, "initrd": None}, "-kernel"), ({"kernel": None, "initrd": None}, "-append"),
    ({"rootfs": None}, "-drive"), ({"agent": VsockChannel(3)}, "virtserialport"),
    ({"memory_hotplug": "virtio-mem"}, "slots="),
])
def test_argv_lacks(changes, absent) -> None:
    assert not any(absent in a for a in build_argv(replace(BASE, **changes), TCG))


def test_rootfs_is_the_first_disk_and_argv_is_deterministic() -> None:
    argv = build_argv(replace(BASE, shared=NinePShare(S / "shared")), TCG)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "virtio-blk-pci,drive=rootfs"
    # Snapshots restore only into identical device sets: same config, same argv.
    assert argv == build_argv(replace(BASE, shared=NinePShare(S / "shared")), TCG)


def test_new_vmgenid_per_config() -> None:
    a, b = VmConfig(state_dir=S), VmConfig(state_dir=S)
    assert a.vmgenid != b.vmgenid


@pytest.mark.parametrize(("changes", "expected", "absent"), [
    ({}, ["console=ttyS0", "kata_py.channel=serial:agent", "kata_py.log=info",
          "memhp_default_state=online_movable"], []),
    ({"agent": VsockChannel(5), "guest_log_level": "debug"}, ["kata_py.channel=vsock:1024", "kata_py.log=debug"], []),
    ({"max_memory_mib": 512}, [], ["memhp_default_state"]),
    ({"kernel_params": ("console=hvc0",), "kernel_params_extra": ("foo=1",)}, ["console=hvc0", "foo=1"],
     ["console=ttyS0"]),
])
def test_kernel_cmdline(changes, expected, absent) -> None:
    params = kernel_cmdline(replace(BASE, **changes)).split()
    for p in expected:
        assert p in params
    for p in absent:
        assert not any(x.startswith(p) for x in params)


def test_kernel_params_extra_come_last_so_they_override() -> None:
    params = kernel_cmdline(replace(BASE, kernel_params_extra=("kata_py.log=debug",))).split()
    assert params[-1] == "kata_py.log=debug" and params.index("kata_py.log=info") < len(params) - 1


def test_append_carries_kernel_cmdline() -> None:
    argv = build_argv(BASE, TCG)
    assert argv[argv.index("-append") + 1] == kernel_cmdline(BASE)


@pytest.mark.parametrize(("changes", "message"), [
    ({"vcpus": 0}, "vcpus must be in"),
    ({"vcpus": 5, "max_vcpus": 4}, "vcpus must be in"),
    ({"max_memory_mib": 256}, "max_memory_mib 256 < memory_mib 512"),
    ({"memory_slots": 0}, "needs memory_slots"),
    ({"memory_hotplug": "virtio-mem", "max_memory_mib": 513}, "not a multiple of block size"),
    ({"machine": "microvm"}, "microvm has no hotplug"),
    ({"kernel": None}, "initrd given without a kernel"),
    ({"agent": VsockChannel(2)}, "reserved"),
    ({"shared": VirtioFsShare(Path("/s")), "ram_file": RamFile(Path("/r"), share=False)}, "virtio-fs needs"),
    ({"incoming_defer": True, "start_paused": True}, "do not combine"),
    ({"state_dir": Path("/" + "x" * 100)}, "socket path too long"),
])
def test_invalid_configs_are_rejected(changes, message) -> None:
    with pytest.raises(InvalidVmConfig, match=message):
        build_argv(replace(BASE, **changes), TCG)


@pytest.mark.parametrize(("raw", "escaped"), [("/a", "/a"), ("/a,b", "/a,,b"), ("a,,b", "a,,,,b")])
def test_opt_escaping(raw, escaped) -> None:
    assert opt(raw) == escaped
