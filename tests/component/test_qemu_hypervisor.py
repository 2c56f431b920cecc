"""QemuHypervisor against a real QEMU started paused (-S, no guest kernel): launch, QMP, hotplug
slots, migration to a file, kill/watch. Needs qemu-system-x86_64; cheap on CPU since nothing runs."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from vmm.accel import AccelChoice
from vmm.config import RamFile, VmConfig
from vmm.errors import HotplugError, MigrationError, VmNotRunning, VmStartError
from vmm.hypervisor import Hypervisor, VmExit
from vmm.qemu import QemuHypervisor

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")

TCG = AccelChoice("tcg", "tests run under TCG")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short path on purpose: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="kp-vmm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def paused_config(state_dir: Path, **kw) -> VmConfig:
    # multi-threaded TCG, so that vCPU unplug reaches QEMU (single-threaded TCG skips it: it aborts);
    # a paused machine translates nothing, so the MTTCG buffer slices cannot run out here
    kw.setdefault("tcg_multithread", True)
    return VmConfig(state_dir=state_dir, start_paused=True, memory_mib=256, max_memory_mib=1024, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def vm(state_dir: Path, nursery: trio.Nursery):
    hv = QemuHypervisor(paused_config(state_dir), accel=TCG)
    await hv.start(nursery)
    yield hv
    await hv.stop(timeout=5)


async def test_start_stop_leaves_no_process_or_socket(state_dir: Path, nursery: trio.Nursery) -> None:
    exits: list[VmExit] = []
    hv = QemuHypervisor(paused_config(state_dir), accel=TCG, on_exit=exits.append)
    assert isinstance(hv, Hypervisor)
    await hv.start(nursery)
    pid = hv.pid()
    assert pid is not None and alive(pid)
    assert (state_dir / "qmp.sock").exists() and (state_dir / "agent.sock").exists()
    status = await hv.qmp.execute("query-status")
    assert status["status"] == "prelaunch"

    with trio.fail_after(10):
        await hv.stop()
        await hv.stop()  # idempotent
    assert hv.pid() is None and not alive(pid)
    assert exits == [VmExit(0, "stopped")]  # QMP quit is a clean exit, reported exactly once
    assert await hv.wait_exited() == 0
    assert sorted(os.listdir(state_dir)) == ["console.log"]


async def test_kill_9_is_noticed_and_pending_calls_fail(vm: QemuHypervisor) -> None:
    pid = vm.pid()
    assert pid is not None
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            async def pending() -> None:
                # Waits on QMP events that will never come: must fail, not hang, when QEMU dies.
                with pytest.raises(VmNotRunning):
                    await vm.wait_agent_port_open(timeout=60)
            n.start_soon(pending)
            await trio.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        await vm.exited.wait()
    assert vm.exit_info == VmExit(-signal.SIGKILL, "exited")
    assert not vm.exit_info.expected
    with pytest.raises(VmNotRunning):
        await vm.resize_vcpus(2)
    assert not (vm.config.qmp_socket).exists()


async def test_start_failure_reports_console_tail(state_dir: Path, nursery: trio.Nursery) -> None:
    cfg = paused_config(state_dir, rootfs=state_dir / "missing.img")
    hv = QemuHypervisor(cfg, accel=TCG)
    with trio.fail_after(5), pytest.raises(VmStartError, match="QEMU exited with status 1") as info:
        await hv.start(nursery)
    assert "missing.img" in info.value.console_tail
    assert hv.exited.is_set() and hv.exit_info is not None and hv.exit_info.reason == "start-failed"


async def test_cancelling_the_owner_kills_qemu(state_dir: Path) -> None:
    hv = QemuHypervisor(paused_config(state_dir), accel=TCG)
    async with trio.open_nursery() as owner:
        await hv.start(owner)
        pid = hv.pid()
        owner.cancel_scope.cancel()
    assert pid is not None and not alive(pid)
    assert hv.exited.is_set()


async def test_vcpu_hotplug_on_paused_machine(vm: QemuHypervisor) -> None:
    assert await vm.resize_vcpus(3) == 3
    assert len(await vm.vcpu_thread_ids()) == 3
    assert await vm.resize_vcpus(99) == 4  # clamped to max_vcpus
    assert await vm.resize_vcpus(4) == 4  # no-op
    slots = await vm.qmp.execute("query-hotpluggable-cpus")
    assert sorted(s["qom-path"] for s in slots) == [
        "/machine/peripheral/cpu-0-1-0", "/machine/peripheral/cpu-0-2-0",
        "/machine/peripheral/cpu-0-3-0", "/machine/unattached/device[0]"]
    # Unplug needs a booted guest's ACPI (protocols.md §7): QEMU refuses; say so, do not pretend.
    with pytest.raises(HotplugError, match="not supported device type") as info:
        await vm.resize_vcpus(1)
    assert info.value.current == 4


async def test_pc_dimm_hotplug_on_paused_machine(vm: QemuHypervisor) -> None:
    assert await vm.resize_memory(300) == 256 + 128  # rounded up to whole 128 MiB blocks
    assert await vm.resize_memory(640) == 256 + 128 + 256
    devices = await vm.qmp.execute("query-memory-devices")
    assert [(d["data"]["id"], d["data"]["size"] >> 20) for d in devices] == [("dimm0", 128), ("dimm1", 256)]
    assert await vm.resize_memory(10_000) == 1024  # clamped to max_memory_mib
    assert await vm.resize_memory(10_000) == 1024


async def test_pc_dimm_slots_run_out(state_dir: Path, nursery: trio.Nursery) -> None:
    hv = QemuHypervisor(paused_config(state_dir, memory_slots=1), accel=TCG)
    await hv.start(nursery)
    try:
        assert await hv.resize_memory(384) == 384
        with pytest.raises(HotplugError, match="no free memory slot") as info:
            await hv.resize_memory(512)
        assert info.value.current == 384
    finally:
        await hv.stop()


async def test_virtio_mem_resize_sets_requested_size(state_dir: Path, nursery: trio.Nursery) -> None:
    hv = QemuHypervisor(paused_config(state_dir, memory_hotplug="virtio-mem"), accel=TCG, virtio_mem_settle=0.1)
    await hv.start(nursery)
    try:
        # No guest driver to plug blocks: QEMU reports nothing plugged yet, and so do we.
        assert await hv.resize_memory(512) == 256
        (dev,) = await hv.qmp.execute("query-memory-devices")
        assert dev["type"] == "virtio-mem"
        assert dev["data"]["requested-size"] == 256 << 20 and dev["data"]["size"] == 0
        await hv.resize_memory(1)  # clamped to base: requested-size back to 0
        (dev,) = await hv.qmp.execute("query-memory-devices")
        assert dev["data"]["requested-size"] == 0
    finally:
        await hv.stop()


async def test_snapshot_save_and_restore(state_dir: Path, nursery: trio.Nursery) -> None:
    state_file = state_dir / "vm.state"
    cfg = paused_config(state_dir / "a")
    src = QemuHypervisor(cfg, accel=TCG)
    await src.start(nursery)
    await src.resize_vcpus(2)
    await src.save_snapshot(state_file)
    await src.stop()
    assert state_file.stat().st_size > 0

    # Same devices (including the hot-added vCPU, cold-plugged now), new state dir.
    clone = QemuHypervisor(replace(cfg, state_dir=state_dir / "b", start_paused=False, incoming_defer=True, vcpus=2),
                           accel=TCG)
    await clone.start(nursery)
    try:
        with pytest.raises(MigrationError, match="does not exist"):
            await clone.restore_snapshot(state_dir / "nope")
        await clone.restore_snapshot(state_file, resume=False)
        assert (await clone.qmp.execute("query-migrate"))["status"] == "completed"
        assert (await clone.qmp.execute("query-status"))["status"] != "running"
    finally:
        await clone.stop()


async def test_qemu_dying_during_snapshot_is_a_migration_error(state_dir: Path, nursery: trio.Nursery) -> None:
    hv = QemuHypervisor(paused_config(state_dir), accel=TCG)
    await hv.start(nursery)
    pid = hv.pid()
    assert pid is not None

    async def kill_soon() -> None:
        await trio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    os.kill(pid, signal.SIGSTOP)  # QEMU stops answering mid-operation
    nursery.start_soon(kill_soon)
    with trio.fail_after(5), pytest.raises(MigrationError, match="QEMU went away"):
        await hv.save_snapshot(state_dir / "vm.state")
    await hv.stop()
    assert hv.exit_info == VmExit(-signal.SIGKILL, "exited")


async def test_template_and_clone_with_ignore_shared(state_dir: Path, nursery: trio.Nursery) -> None:
    # Kata's VM-template idea (guest-notes): the template's RAM is a shared file, left out of the
    # state file; a clone maps the same file privately and loads only the device state.
    ram = state_dir / "template.ram"
    template_cfg = paused_config(state_dir / "t", ram_file=RamFile(ram, share=True))
    template = QemuHypervisor(template_cfg, accel=TCG)
    await template.start(nursery)
    await template.save_snapshot(state_dir / "t.state", ignore_shared=True)
    await template.stop()
    assert (state_dir / "t.state").stat().st_size < 4 << 20  # RAM (256 MiB) not in the file

    clone_cfg = replace(template_cfg, state_dir=state_dir / "c", ram_file=RamFile(ram, share=False),
                        start_paused=False, incoming_defer=True)
    clone = QemuHypervisor(clone_cfg, accel=TCG)
    await clone.start(nursery)
    try:
        await clone.restore_snapshot(state_dir / "t.state", ignore_shared=True, resume=False)
        assert (await clone.qmp.execute("query-migrate"))["status"] == "completed"
    finally:
        await clone.stop()


async def test_lost_qmp_link_kills_the_unmanageable_qemu(vm: QemuHypervisor) -> None:
    pid = vm.pid()
    await vm.qmp.aclose()  # QEMU lives on, but nothing can manage it any more
    with trio.fail_after(5):
        assert await vm.wait_exited() == -signal.SIGKILL
    assert vm.exit_info is not None and vm.exit_info.reason == "qmp-eof"
    assert pid is not None and not alive(pid)


async def test_stop_during_start_aborts_the_start(state_dir: Path) -> None:
    hv = QemuHypervisor(paused_config(state_dir), accel=TCG)
    pids: list[int] = []

    async def starter(nursery: trio.Nursery) -> None:
        with pytest.raises(VmStartError, match="while the VM was starting"):
            await hv.start(nursery)

    with trio.fail_after(10):
        async with trio.open_nursery() as owner:
            owner.start_soon(starter, owner)
            while True:  # polling: the launch has no event of its own
                pid = hv.pid()
                if pid is not None:
                    break
                await trio.sleep(0.001)
            pids.append(pid)
            os.kill(pid, signal.SIGSTOP)  # QEMU hangs before listening: the start cannot finish
            await hv.stop(timeout=2)
    assert not alive(pids[0])
    assert hv.exit_info is not None and hv.exit_info.reason == "start-failed"
