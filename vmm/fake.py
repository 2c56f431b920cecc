"""FakeHypervisor: an in-memory Hypervisor for unit tests of the shim and the reconciler.

Behaves like QemuHypervisor from the outside (same clamping, same errors, exit reporting through
`exited`, `exit_info` and `on_exit`) without any process. Tests steer it with `open_agent_port()`,
`crash()`, and the `refuse_unplug` / `fail_start` knobs, and inspect `calls`.
"""

from __future__ import annotations

from pathlib import Path

import trio

from vmm.accel import AccelChoice
from vmm.config import MEMORY_BLOCK_MIB, VmConfig
from vmm.errors import HotplugError, MigrationError, QmpTimeout, VmmError, VmNotRunning, VmStartError
from vmm.hypervisor import ExitCallback, VmExit


class FakeHypervisor:
    def __init__(self, config: VmConfig, *, on_exit: ExitCallback | None = None, fake_pid: int = 424242) -> None:
        self.config = config
        self.accel_choice = AccelChoice("tcg", "fake hypervisor")
        self.on_exit = on_exit
        self.exited = trio.Event()
        self.exit_info: VmExit | None = None
        self.calls: list[tuple[str, object]] = []
        self.fail_start: str | None = None  # set: start() raises VmStartError with this console tail
        self.refuse_unplug = False  # like QEMU before the guest booted (protocols.md §7)
        self.vcpus = config.vcpus
        self.memory_mib = config.memory_mib
        self.snapshot: dict[str, int] | None = None
        self.console = ""  # what console_tail() returns
        self._fake_pid = fake_pid
        self._started = False
        self._port_open = trio.Event()

    async def start(self, nursery: trio.Nursery) -> None:
        self.calls.append(("start", None))
        if self._started:
            raise VmmError("start() called twice")
        self._started = True
        if self.fail_start is not None:
            self._finish(VmExit(None, "start-failed"))
            raise VmStartError("fake start failure", self.fail_start)
        await trio.lowlevel.checkpoint()

    def open_agent_port(self) -> None:
        """Test hook: the guest opened its agent port."""
        self._port_open.set()

    def crash(self, returncode: int = -9) -> None:
        """Test hook: QEMU died on its own."""
        self._finish(VmExit(returncode, "exited"))

    def _finish(self, info: VmExit) -> None:
        if self.exited.is_set():
            return
        self.exit_info = info
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit(info)

    def _require_running(self) -> None:
        if not self._started or self.exited.is_set():
            raise VmNotRunning("fake VM is not running")

    async def wait_agent_port_open(self, timeout: float) -> None:
        self._require_running()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as n:
                async def watch_exit() -> None:
                    await self.exited.wait()
                    n.cancel_scope.cancel()
                n.start_soon(watch_exit)
                await self._port_open.wait()
                n.cancel_scope.cancel()
        if self.exited.is_set():
            raise VmNotRunning("fake VM exited while waiting for the agent port")
        if not self._port_open.is_set():
            raise QmpTimeout(f"guest did not open the agent port within {timeout} s")

    async def stop(self, timeout: float = 10) -> None:
        self.calls.append(("stop", timeout))
        await trio.lowlevel.checkpoint()
        self._finish(VmExit(0, "stopped"))

    async def wait_exited(self) -> int:
        await self.exited.wait()
        assert self.exit_info is not None
        return self.exit_info.returncode if self.exit_info.returncode is not None else -1

    def pid(self) -> int | None:
        return self._fake_pid if self._started and not self.exited.is_set() else None

    def console_tail(self, max_bytes: int = 4096) -> str:
        return self.console[-max_bytes:]

    async def vcpu_thread_ids(self) -> list[int]:
        self._require_running()
        await trio.lowlevel.checkpoint()
        return [self._fake_pid + 1 + i for i in range(self.vcpus)]

    async def resize_vcpus(self, target: int) -> int:
        self.calls.append(("resize_vcpus", target))
        self._require_running()
        await trio.lowlevel.checkpoint()
        target = max(1, min(target, self.config.max_vcpus))
        if target < self.vcpus:
            if self.refuse_unplug:
                raise HotplugError("fake: device unplug not supported", current=self.vcpus)
            target = max(target, self.config.vcpus)  # boot vCPUs cannot be removed
        self.vcpus = target
        return self.vcpus

    async def resize_memory(self, target_mib: int) -> int:
        self.calls.append(("resize_memory", target_mib))
        self._require_running()
        await trio.lowlevel.checkpoint()
        cfg = self.config
        target = max(cfg.memory_mib, min(target_mib, cfg.max_memory_mib))
        if target > self.memory_mib and cfg.memory_hotplug == "pc-dimm":
            step = -(-(target - self.memory_mib) // MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB
            room = (cfg.max_memory_mib - self.memory_mib) // MEMORY_BLOCK_MIB * MEMORY_BLOCK_MIB
            target = self.memory_mib + min(step, room)
        elif target < self.memory_mib and self.refuse_unplug:
            raise HotplugError("fake: device unplug not supported", current=self.memory_mib)
        self.memory_mib = target
        return self.memory_mib

    async def save_snapshot(self, state_path: Path, *, ignore_shared: bool = False) -> None:
        self.calls.append(("save_snapshot", state_path))
        self._require_running()
        await trio.lowlevel.checkpoint()
        self.snapshot = {"vcpus": self.vcpus, "memory_mib": self.memory_mib}

    async def restore_snapshot(self, state_path: Path, *, ignore_shared: bool = False, resume: bool = True) -> None:
        self.calls.append(("restore_snapshot", state_path))
        self._require_running()
        if not self.config.incoming_defer:
            raise MigrationError("restore_snapshot needs a VM started with incoming_defer=True")
        await trio.lowlevel.checkpoint()
        self._port_open.set()  # a restored guest already has its port open
