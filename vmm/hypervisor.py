"""The Hypervisor interface the shim (sandbox, resource reconciler) programs against.

Two implementations: `vmm.qemu.QemuHypervisor` (real) and `vmm.fake.FakeHypervisor` (unit tests of
other packages). Only what can block is async.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from vmm.accel import AccelChoice


@dataclass(frozen=True)
class VmExit:
    """How the VM ended.

    ``reason``: "stopped" (stop() asked for it), "exited" (QEMU exited on its own: guest
    poweroff/panic, crash, killed by someone else), "qmp-eof" (QMP link lost while QEMU lived on; we
    killed it since it can no longer be managed), "start-failed".
    """

    returncode: int | None
    reason: str

    @property
    def expected(self) -> bool:
        return self.reason == "stopped"


ExitCallback = Callable[[VmExit], None]


@runtime_checkable
class Hypervisor(Protocol):
    accel_choice: AccelChoice
    exited: trio.Event  # set once the VM is gone; exit_info is then set
    exit_info: VmExit | None
    on_exit: ExitCallback | None  # called once, from the watcher task, when the VM is gone

    async def start(self, nursery: trio.Nursery) -> None:
        """Launch the VM; its watcher lives in ``nursery``. Raises VmStartError (with console tail)."""

    async def wait_agent_port_open(self, timeout: float) -> None:
        """Return once the guest opened the agent port. Raises QmpTimeout, VmNotRunning."""

    async def stop(self, timeout: float = 10) -> None:
        """Make sure the VM is gone, escalating until it is. Idempotent; never raises VmmError."""

    async def wait_exited(self) -> int:
        """Wait until the VM is gone; returns QEMU's exit status (negative: killed by that signal)."""

    def pid(self) -> int | None:
        """QEMU's pid while it runs, else None."""

    def console_tail(self, max_bytes: int = 4096) -> str:
        """The end of the guest console / QEMU stderr log, for error messages."""

    async def vcpu_thread_ids(self) -> list[int]:
        """Host thread ids of the present vCPUs (for cgroup placement). Raises VmNotRunning."""

    async def resize_vcpus(self, target: int) -> int:
        """Move toward ``target`` vCPUs (clamped to [1, max]); returns the count now present.

        Raises HotplugError (``.current`` = count in place) when QEMU or the guest refuses."""

    async def resize_memory(self, target_mib: int) -> int:
        """Move toward ``target_mib`` (clamped to [base, max]); returns base + plugged MiB now.

        Raises HotplugError when QEMU refuses (no free slot, backend allocation failed)."""

    async def save_snapshot(self, state_path: Path, *, ignore_shared: bool = False) -> None:
        """Pause the VM and write its device+RAM state to ``state_path``. Raises MigrationError."""

    async def restore_snapshot(
        self, state_path: Path, *, ignore_shared: bool = False, resume: bool = True
    ) -> None:
        """Load state into a VM started with ``incoming_defer``; ``resume`` sends cont. Raises MigrationError."""
