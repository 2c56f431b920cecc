"""The vmm error family: one root, a few subclasses callers can act on.

The shim maps these onto its own closed error set at its boundary; nothing here knows about it.
"""

from __future__ import annotations

from typing import Any


class VmmError(Exception):
    """Root of every error raised by the vmm package."""


class InvalidVmConfig(VmmError, ValueError):
    """A VmConfig that QEMU could not run (or that would silently misbehave)."""


class AccelUnavailable(VmmError):
    """The requested accelerator cannot be used on this host."""


class VmStartError(VmmError):
    """QEMU did not come up; ``console_tail`` holds the last lines of its console/stderr log."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(f"{message}\n--- console tail ---\n{console_tail}" if console_tail else message)
        self.console_tail = console_tail


class VmNotRunning(VmmError):
    """An operation needs a running QEMU (not started yet, or already exited)."""


class QmpError(VmmError):
    """QEMU answered a QMP command with an error.

    Carries what was sent and the error class/desc QEMU returned, like qemu.qmp's ExecuteError.
    """

    def __init__(self, command: str, arguments: dict[str, Any] | None, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc


class QmpDisconnected(VmmError):
    """The QMP connection is gone (QEMU exited or closed the monitor); pending calls fail with this."""


class HotplugError(VmmError):
    """A hot-plug or hot-unplug request was refused; ``current`` is the count/size still in place."""

    def __init__(self, message: str, current: int) -> None:
        super().__init__(message)
        self.current = current


class MigrationError(VmmError):
    """Saving or restoring a snapshot (QEMU migration) failed or timed out."""


class QmpTimeout(VmmError):
    """A QMP command or an awaited QMP event did not arrive in time."""
