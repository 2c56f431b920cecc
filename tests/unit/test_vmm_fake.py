"""FakeHypervisor honours the Hypervisor contract that other packages' unit tests rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vmm.config import VmConfig
from vmm.errors import HotplugError, QmpTimeout, VmNotRunning, VmStartError
from vmm.fake import FakeHypervisor
from vmm.hypervisor import Hypervisor, VmExit

CFG = VmConfig(state_dir=Path("/nonexistent"), vcpus=1, max_vcpus=4, memory_mib=512, max_memory_mib=1024)


async def test_lifecycle_and_exit_reporting(nursery: trio.Nursery) -> None:
    exits: list[VmExit] = []
    hv = FakeHypervisor(CFG, on_exit=exits.append)
    assert isinstance(hv, Hypervisor)
    assert hv.pid() is None
    await hv.start(nursery)
    assert hv.pid() is not None
    hv.crash(-9)
    assert await hv.wait_exited() == -9
    await hv.stop()  # after a crash: no second report
    assert exits == [VmExit(-9, "exited")]
    with pytest.raises(VmNotRunning):
        await hv.resize_vcpus(2)


async def test_start_failure(nursery: trio.Nursery) -> None:
    hv = FakeHypervisor(CFG)
    hv.fail_start = "kernel panic"
    hv.console = "x" * 10 + "end"
    assert hv.console_tail(3) == "end"
    with pytest.raises(VmStartError) as info:
        await hv.start(nursery)
    assert info.value.console_tail == "kernel panic"
    assert hv.exit_info == VmExit(None, "start-failed")


async def test_agent_port(nursery: trio.Nursery, autojump_clock) -> None:
    hv = FakeHypervisor(CFG)
    await hv.start(nursery)
    with pytest.raises(QmpTimeout):
        await hv.wait_agent_port_open(timeout=5)
    nursery.start_soon(hv.wait_agent_port_open, 5)
    hv.open_agent_port()
    await hv.wait_agent_port_open(timeout=0.1)

    async def crash_soon() -> None:
        await trio.sleep(1)
        hv.crash()
    hv = FakeHypervisor(CFG)
    await hv.start(nursery)
    nursery.start_soon(crash_soon)
    with pytest.raises(VmNotRunning):
        await hv.wait_agent_port_open(timeout=60)


async def test_resize_clamps_rounds_and_refuses_like_qemu(nursery: trio.Nursery) -> None:
    hv = FakeHypervisor(CFG)
    await hv.start(nursery)
    assert await hv.resize_vcpus(99) == 4
    assert await hv.resize_vcpus(0) == 1
    assert await hv.resize_memory(600) == 640  # whole 128 MiB DIMMs
    assert await hv.resize_memory(5000) == 1024
    hv.refuse_unplug = True
    await hv.resize_vcpus(3)
    with pytest.raises(HotplugError) as info:
        await hv.resize_vcpus(1)
    assert info.value.current == 3
    assert ("resize_vcpus", 1) in hv.calls
