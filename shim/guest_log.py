"""The guest's log lines in the shim's log (containerd's log), with their levels, rate-limited (#18).

The agent logs to the guest console ("kata-py-agent LEVEL logger: message"), which QEMU appends to
`<state>/console.log` (bounded by vmm/console.py). The sandbox follows that file: complete new lines,
each made printable and cut to MAX_LINE, agent lines at their own level and everything else (the
guest kernel) at debug. Everything in it is the guest's, so hostile: a line can claim any level
but never escape its own log record, and a guest writing without end costs at most LINES_PER_S
records a second plus one record saying how many were dropped.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import trio

MAX_LINE = 1000  # characters of one guest line that reach the log
MAX_READ = 256 * 1024  # bytes read per pass; a guest that wrote more skips ahead (counted as dropped)
LINES_PER_S = 50

_AGENT = re.compile(r"kata-py-agent (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def record_of(raw: bytes) -> tuple[int, str]:
    """(level, text) of one console line: an agent line at its level, anything else at debug."""
    text = _UNPRINTABLE.sub("?", raw.decode("utf-8", errors="replace").rstrip("\r"))[:MAX_LINE]
    m = _AGENT.fullmatch(text)
    if m:
        return _LEVELS[m.group(1)], m.group(2)
    return logging.DEBUG, text


@dataclass
class ConsoleFollower:
    """Reads the complete lines appended to a console log since the last call."""

    path: Path
    offset: int = 0
    partial: bytes = b""
    dropped: int = 0  # runs of bytes skipped because the guest wrote too fast

    def start_at_end(self) -> None:
        try:
            self.offset = os.stat(self.path).st_size
        except OSError:
            self.offset = 0

    def read(self) -> list[bytes]:
        """New complete lines (blocking I/O: call from a thread). Never raises."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            size = os.fstat(fd).st_size
            if size < self.offset:  # not ours any more (replaced): start over at its end
                self.offset, self.partial = size, b""
                return []
            if size - self.offset > MAX_READ:
                self.dropped += 1
                self.offset, self.partial = size - MAX_READ, b""
            data = os.pread(fd, size - self.offset, self.offset)
        except OSError:
            return []
        finally:
            os.close(fd)
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        if len(self.partial) > MAX_LINE * 4:  # a line without end: cut it
            lines.append(self.partial)
            self.partial = b""
        return lines


async def follow(path: Path, log: logging.Logger, prefix: str, interval: float = 1.0) -> None:
    """Log the guest's new console lines every `interval` s until cancelled (from the file's end
    now: earlier lines are in the file, and in the tail a start error quotes)."""
    follower = ConsoleFollower(path)
    await trio.to_thread.run_sync(follower.start_at_end)

    async def one_pass() -> None:
        lines = await trio.to_thread.run_sync(follower.read)
        dropped = emit(log, prefix, lines, max(1, int(LINES_PER_S * interval))) + follower.dropped
        follower.dropped = 0
        if dropped:
            log.warning("%s: %d console lines dropped (the guest writes faster than %d lines/s)",
                        prefix, dropped, LINES_PER_S)

    try:
        while True:
            await trio.sleep(interval)
            await one_pass()
    finally:  # the last lines before the VM stopped (a short-lived pod's whole story)
        with trio.CancelScope(shield=True):
            await one_pass()


def emit(log: logging.Logger, prefix: str, lines: list[bytes], budget: int) -> int:
    """Log up to `budget` lines as `prefix: text` at their levels; return how many were dropped."""
    for raw in lines[:budget]:
        level, text = record_of(raw)
        if text:
            log.log(level, "%s: %s", prefix, text)
    return max(0, len(lines) - budget)
