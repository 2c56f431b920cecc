"""OciRuntime.start for crun releases the container's init through its exec fifo, as `crun start` does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.oci_runtime import OciRuntime


class RecordingReaper:
    """Stands in for the agent's reaper: records the commands the runtime would have run."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, argv: list[str], input: bytes | None = None, timeout: float = 60.0):  # noqa: A002
        self.commands.append(argv)

        class Done:
            code, stdout, stderr = 0, b"", b""
        return Done()


def _runtime(tmp_path: Path, name: str) -> tuple[OciRuntime, RecordingReaper]:
    reaper = RecordingReaper()
    return OciRuntime(name, f"/usr/bin/{name}", str(tmp_path), reaper), reaper  # type: ignore[arg-type]


def test_crun_start_writes_one_byte_to_the_waiting_init_and_removes_the_fifo(tmp_path: Path) -> None:
    runtime, reaper = _runtime(tmp_path, "crun")
    (tmp_path / "c1").mkdir()
    fifo = tmp_path / "c1" / "exec.fifo"
    os.mkfifo(fifo, 0o600)
    init_end = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the blocked container init's end
    try:
        runtime.start("c1")
        assert os.read(init_end, 16) == b"\0"
    finally:
        os.close(init_end)
    assert not fifo.exists()  # crun now reports the container as running
    assert reaper.commands == []  # no crun exec


@pytest.mark.parametrize("make_fifo", [False, True], ids=["no fifo", "no reader"])
def test_crun_start_falls_back_to_the_binary(tmp_path: Path, make_fifo: bool) -> None:
    runtime, reaper = _runtime(tmp_path, "crun")
    (tmp_path / "c1").mkdir()
    if make_fifo:
        os.mkfifo(tmp_path / "c1" / "exec.fifo", 0o600)  # an init that died leaves no reader
    runtime.start("c1")
    assert reaper.commands == [["/usr/bin/crun", "--root", str(tmp_path), "start", "c1"]]


def test_runc_start_runs_the_binary(tmp_path: Path) -> None:
    # runc's fifo works the other way round (its init writes, `runc start` reads): never touched
    runtime, reaper = _runtime(tmp_path, "runc")
    runtime.start("c1")
    assert reaper.commands == [["/usr/bin/runc", "--root", str(tmp_path), "start", "c1"]]
