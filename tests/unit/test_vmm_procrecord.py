"""Process records (issue #14): a recorded pid is only killed while its start time and boot still
match. The parsing is pure; the kill tests use a real `sleep` (no VM) that they reap themselves."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm.procrecord import (
    ProcRecord,
    check_recorded,
    format_record,
    identify,
    is_same,
    kill_recorded,
    parse_record,
    parse_stat,
    read_record,
    write_record,
)

BOOT = "00000000-1111-4222-8333-444444444444"  # not this boot


def stat_line(comm: str, state: str = "S", start: int = 4242) -> str:
    # fields 3..52 as the kernel writes them: state, ppid, ... field 22 = start time
    after = [state, "1", "1", "1", "0", "-1", "4194560"] + ["0"] * 12 + [str(start)] + ["0"] * 30
    return f"1234 ({comm}) " + " ".join(after) + "\n"


@pytest.mark.parametrize("comm", ["qemu-system-x86", "a b", "x) S 1 2 3 (y", ")", "", "((("])
def test_start_time_is_field_22_whatever_the_command_name(comm: str):
    assert parse_stat(stat_line(comm, start=987654)) == ("S", 987654)


@pytest.mark.parametrize("bad", ["", "1234 (qemu", "1234 (qemu) S 1 2", "1234 (q) S" + " 1" * 18 + " x" + " 0" * 30])
def test_a_garbled_stat_line_is_an_error(bad: str):
    with pytest.raises(ValueError):
        parse_stat(bad)


def test_own_stat_parses():
    state, start = parse_stat(Path("/proc/self/stat").read_text())
    assert state == "R" and start > 0


def test_record_round_trips():
    record = ProcRecord(77, 123456, BOOT)
    assert parse_record(format_record(record)) == record


@pytest.mark.parametrize("bad", ["", "77 123\n", f"77 123 {BOOT}", f"0 1 {BOOT}\n", f"-7 1 {BOOT}\n",
                                 f"77 1e3 {BOOT}\n", f"77  123 {BOOT}\n", "77 123 ../../x\n",
                                 f"７７ 123 {BOOT}\n", f"77 123 {BOOT} extra\n", f"77 123 {BOOT}\n\n"])
def test_a_malformed_record_is_an_error(bad: str):
    with pytest.raises(ValueError):
        parse_record(bad)


def test_same_process_only_when_start_time_boot_and_liveness_match():
    record = ProcRecord(1234, 4242, BOOT)
    assert is_same(record, stat_line("qemu"), BOOT)
    assert not is_same(record, stat_line("qemu", start=4243), BOOT)  # the pid was reused
    assert not is_same(record, stat_line("qemu"), BOOT.replace("4", "5"))  # another boot
    assert not is_same(record, stat_line("qemu", state="Z"), BOOT)  # exited already
    assert not is_same(record, "garbage", BOOT)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_write_then_kill_the_recorded_process(tmp_path: Path, sleeper: subprocess.Popen[bytes]):
    path = tmp_path / "qemu.proc"
    record = write_record(path, sleeper.pid)
    assert read_record(path) == record == identify(sleeper.pid)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert os.listdir(tmp_path) == ["qemu.proc"]  # no temporary left
    assert kill_recorded(path) == sleeper.pid
    assert sleeper.wait(timeout=5) == -9
    assert kill_recorded(path) is None  # gone: nothing to kill any more


def test_a_reused_pid_with_another_start_time_is_not_killed(tmp_path: Path, sleeper: subprocess.Popen[bytes]):
    path = tmp_path / "qemu.proc"
    live = write_record(path, sleeper.pid)
    # the recorded process exited and its pid went to `sleeper`: same pid, other start time
    path.write_text(format_record(ProcRecord(live.pid, live.start_ticks - 1, live.boot_id)))
    assert kill_recorded(path) is None
    path.write_text(format_record(ProcRecord(live.pid, live.start_ticks, BOOT)))  # a record of an older boot
    assert kill_recorded(path) is None
    assert sleeper.poll() is None


def test_no_record_or_a_malformed_one_kills_nothing(tmp_path: Path, sleeper: subprocess.Popen[bytes]):
    assert kill_recorded(tmp_path / "absent") is None
    bad = tmp_path / "bad"
    bad.write_text(f"{sleeper.pid}\n")
    with pytest.raises(ValueError):
        kill_recorded(bad)
    link = tmp_path / "link"
    write_record(tmp_path / "real", sleeper.pid)
    link.symlink_to(tmp_path / "real")
    with pytest.raises(OSError):  # never followed
        kill_recorded(link)
    assert sleeper.poll() is None


def test_a_zombie_or_a_gone_process_cannot_be_recorded(tmp_path: Path):
    proc = subprocess.Popen(["true"])
    while b") Z" not in Path(f"/proc/{proc.pid}/stat").read_bytes():
        pass  # exited, not reaped yet
    with pytest.raises(ProcessLookupError):
        write_record(tmp_path / "r", proc.pid)
    proc.wait()
    with pytest.raises(ProcessLookupError):
        write_record(tmp_path / "r", proc.pid)
    assert not (tmp_path / "r").exists()


def test_check_names_the_recorded_process_only(tmp_path: Path, sleeper: subprocess.Popen[bytes]):
    path = tmp_path / "qemu.proc"
    with pytest.raises(ProcessLookupError):
        check_recorded(path, sleeper.pid)  # no record
    record = write_record(path, sleeper.pid)
    assert check_recorded(path, sleeper.pid) == record
    with pytest.raises(ProcessLookupError):
        check_recorded(path, os.getpid())  # another pid
    path.write_text(format_record(ProcRecord(record.pid, record.start_ticks + 1, record.boot_id)))
    with pytest.raises(ProcessLookupError):
        check_recorded(path, sleeper.pid)  # the pid was reused
