"""Who a recorded process is: pid + start time (+ boot), so that a process is only ever signalled
while it is provably the one recorded (pids get reused).

A record file (`qemu.proc` next to a VM's sockets, `pool.proc` for a pool) holds one line,
``<pid> <start ticks> <boot id>``: the start time is field 22 of /proc/<pid>/stat (clock ticks
since boot), the boot id /proc/sys/kernel/random/boot_id (a start time means nothing after a reboot).
The shim writes it when it starts, restores or adopts a QEMU, the pool when it starts its VMs and for
itself; `delete` and the pool kill exactly the recorded process, through a pidfd opened before the
check (so that the pid cannot be reused between check and kill). Stdlib only: `delete` imports this.
"""

from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path

QEMU_RECORD = "qemu.proc"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_DEAD_STATES = {"Z", "X", "x"}  # zombie, dead: exited, only not reaped yet
_MAX_RECORD = 256


@dataclass(frozen=True)
class ProcRecord:
    pid: int
    start_ticks: int
    boot_id: str


# ---- pure -----------------------------------------------------------------------------------------
def parse_stat(stat: str) -> tuple[str, int]:
    """(state, start ticks) from a /proc/<pid>/stat line. The command name (field 2) is in
    parentheses and may itself hold spaces and parentheses: the fields resume after the last ')'.
    Raises ValueError."""
    _, sep, rest = stat.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    return fields[0], _decimal(fields[19], "start time")  # fields[0] is field 3 (state), [19] field 22


def parse_record(text: str) -> ProcRecord:
    """Raises ValueError unless `text` is exactly what format_record writes."""
    parts = text.split(" ")
    if len(parts) != 3 or not text.endswith("\n"):
        raise ValueError(f"malformed process record {text[:80]!r}")
    pid, start, boot = _decimal(parts[0], "pid"), _decimal(parts[1], "start time"), parts[2].removesuffix("\n")
    if pid <= 0 or not _is_boot_id(boot):
        raise ValueError(f"malformed process record {text[:80]!r}")
    return ProcRecord(pid, start, boot)


def format_record(record: ProcRecord) -> str:
    return f"{record.pid} {record.start_ticks} {record.boot_id}\n"


def is_same(record: ProcRecord, stat: str, boot_id: str) -> bool:
    """Whether `stat` (the current /proc/<pid>/stat of record.pid) and `boot_id` show the recorded
    process, still running (a zombie has exited already)."""
    try:
        state, start = parse_stat(stat)
    except ValueError:
        return False
    return start == record.start_ticks and boot_id == record.boot_id and state not in _DEAD_STATES


def _decimal(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise ValueError(f"{what} {text[:30]!r} is not a decimal number")
    return int(text)


def _is_boot_id(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c in "0123456789abcdef-" for c in text)


# ---- tiny I/O -------------------------------------------------------------------------------------
def boot_id() -> str:
    return BOOT_ID.read_text().strip()


def identify(pid: int) -> ProcRecord | None:
    """The identity of the process `pid` is now; None when there is none running (gone, zombie)."""
    try:
        state, start = parse_stat(Path(f"/proc/{pid}/stat").read_text())
        return None if state in _DEAD_STATES else ProcRecord(pid, start, boot_id())
    except (OSError, ValueError):
        return None


def write_record(path: Path, pid: int) -> ProcRecord:
    """Record the running process `pid` in `path` (0600, atomically: a reader sees the old record or
    the new one, never a part). Raises ProcessLookupError when it is not running, OSError."""
    record = identify(pid)
    if record is None:
        raise ProcessLookupError(f"process {pid} is not running: cannot record it in {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, format_record(record).encode())
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return record


def read_record(path: Path) -> ProcRecord | None:
    """None when there is no record; raises ValueError when it is malformed, OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, _MAX_RECORD + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_RECORD:
        raise ValueError(f"process record {path} is too long")
    return parse_record(data.decode("ascii", errors="replace"))


def is_running(record: ProcRecord) -> bool:
    """Whether the recorded process still runs (pid, start time and boot all match)."""
    return identify(record.pid) == record


def check_recorded(path: Path, pid: int) -> ProcRecord:
    """The record in `path`, which must name `pid` while it still is the recorded process. Raises
    ProcessLookupError (no record, another pid, not that process any more), ValueError (malformed),
    OSError."""
    record = read_record(path)
    if record is None or record.pid != pid or not is_running(record):
        raise ProcessLookupError(f"{path} does not record the running process {pid}: {record}")
    return record


def open_recorded(record: ProcRecord) -> int | None:
    """A pidfd of the recorded process, or None when it no longer runs. The pidfd is opened first
    and the identity checked after: if the check passes, the pidfd is the recorded process (a pid
    reused before the open would show another start time). Raises OSError (not ESRCH)."""
    try:
        fd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return None
    if not is_running(record):
        os.close(fd)
        return None
    return fd


def kill_recorded(path: Path, timeout: float = 2.0) -> int | None:
    """SIGKILL the process recorded in `path` if it still is the recorded one, and wait up to
    `timeout` s for it to exit (not for its reaping: its parent does that). Returns the pid killed,
    None when there was no record or the process is gone. Raises ValueError (malformed record),
    OSError."""
    record = read_record(path)
    if record is None:
        return None
    fd = open_recorded(record)
    if fd is None:
        return None
    try:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            return None  # exited and reaped since the check
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # a pidfd is readable once its process exited
        poller.poll(int(timeout * 1000))
    finally:
        os.close(fd)
    return record.pid
