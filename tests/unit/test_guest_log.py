"""The guest's console lines reach the shim's log at their levels; hostile lines stay one record each,
printable and short, and a flood is cut to a rate with a count of what was dropped (#18)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from shim import guest_log
from shim.guest_log import MAX_LINE, MAX_READ, ConsoleFollower, emit, record_of


def test_agent_lines_keep_their_level_the_rest_is_debug():
    assert record_of(b"kata-py-agent WARNING agent: OOM in c1") == (logging.WARNING, "agent: OOM in c1")
    assert record_of(b"kata-py-agent ERROR agent.server: boom\r") == (logging.ERROR, "agent.server: boom")
    assert record_of(b"[    0.512] virtio_blk virtio1: [vda] 294 blocks") == (
        logging.DEBUG, "[    0.512] virtio_blk virtio1: [vda] 294 blocks")
    assert record_of(b"kata-py-agent NOTALEVEL x")[0] == logging.DEBUG


def test_hostile_lines_are_printable_and_short():
    level, text = record_of(b"kata-py-agent ERROR \x1b[2J\x00fake\x07 " + b"x" * 5000)
    assert level == logging.ERROR and "\x1b" not in text and "\x00" not in text and "\x07" not in text
    assert len(text) <= MAX_LINE
    assert record_of(b"\xff\xfe caf\xc3\xa9")[1].endswith("café")  # invalid UTF-8 replaced, valid kept


def test_follower_reads_complete_lines_only_and_skips_a_flood(tmp_path: Path):
    path = tmp_path / "console.log"
    path.write_bytes(b"before start\n")
    f = ConsoleFollower(path)
    f.start_at_end()
    with open(path, "ab") as out:
        out.write(b"one\ntw")
        out.flush()
        assert f.read() == [b"one"]
        out.write(b"o\nthree\n")
        out.flush()
        assert f.read() == [b"two", b"three"]
        out.write(b"y" * (MAX_READ * 3) + b"\nlast\n")
        out.flush()
        lines = f.read()
    assert lines[-1] == b"last" and f.dropped == 1
    path.write_bytes(b"")  # replaced (shorter): start over at its end, no error
    assert f.read() == []
    assert ConsoleFollower(tmp_path / "none").read() == []


def test_emit_logs_within_the_budget_and_counts_the_rest(caplog: pytest.LogCaptureFixture):
    log = logging.getLogger("test.guest")
    caplog.set_level(logging.DEBUG, logger="test.guest")
    dropped = emit(log, "guest p1", [b"kata-py-agent INFO agent: a", b"kernel b", b"kata-py-agent INFO agent: c"], 2)
    assert dropped == 1
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "guest p1: agent: a"), (logging.DEBUG, "guest p1: kernel b")]


async def test_follow_logs_new_lines_and_says_how_many_it_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(guest_log, "LINES_PER_S", 20)
    path = tmp_path / "console.log"
    path.write_bytes(b"kata-py-agent ERROR agent: old news\n")
    caplog.set_level(logging.DEBUG, logger="test.follow")
    log = logging.getLogger("test.follow")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest_log.follow, path, log, "guest p1", 0.1)
        await trio.sleep(0.05)
        with open(path, "ab") as out:
            out.write(b"kata-py-agent WARNING agent: fresh\n" + b"spam\n" * 10)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert "guest p1: agent: fresh" in messages and not any("old news" in m for m in messages)
    assert messages.count("guest p1: spam") == 1  # 2 lines a pass at 20/s and 0.1 s
    assert any("9 console lines dropped" in m for m in messages), messages
