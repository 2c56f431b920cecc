"""The pool's spare shim daemons (shim/spare.py): keep N started, hand one to each `start` that asks.

A spare is a `python -m shim -spare <socket>` process that has imported the daemon's code and waits
on its own socket in `<pool dir>/spares/`. `take()` gives its socket to one `start` and forgets it:
from then on it is that pod's daemon (it stays our child only for reaping, by a task in the nursery
`run()` holds: while the pool runs it reaps them; after, whoever inherits them does). When the pool
stops, the spares nobody took are terminated; a spare whose pool is gone exits by itself (it watches
its parent).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import trio

from kata_trio import open_nursery_unwrapped

from ..args import spare_argv

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0  # imports take ~0.5 s; a loaded host may take far longer
RETRY_AFTER_FAILURE_S = 5.0
STOP_GRACE_S = 5.0


class SpareShims:
    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self.ready: list[tuple[trio.Process, Path]] = []
        self._wanted = trio.Event()
        self._counter = 0
        self._reapers: trio.Nursery | None = None  # run()'s: waits for the spares handed out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep `count` spares ready until cancelled (the first fill completes before started());
        then terminate those still waiting."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        try:
            async with open_nursery_unwrapped() as self._reapers:
                started = False
                while True:
                    while len(self.ready) < self.count:
                        spare = await self._start_one()
                        if spare is None:
                            await trio.sleep(RETRY_AFTER_FAILURE_S)
                            continue
                        self.ready.append(spare)
                    if not started:
                        started = True
                        task_status.started()
                    self._wanted = trio.Event()
                    await self._wanted.wait()
        finally:
            self._reapers = None
            with trio.CancelScope(shield=True):
                waiting, self.ready = self.ready, []
                for proc, _ in waiting:
                    await _terminate(proc)
                shutil.rmtree(self.directory, ignore_errors=True)

    def take(self) -> str | None:
        """The socket of a ready spare, now the caller's; None if there is none."""
        while self.ready:
            proc, path = self.ready.pop(0)
            self._wanted.set()
            if proc.returncode is None and path.exists():
                # only run() fills `ready`, so its nursery is open; we stay the spare's parent until it exits
                assert self._reapers is not None
                self._reapers.start_soon(_reap, proc)
                return str(path)
            log.warning("pool: spare shim %d is gone (%s)", proc.pid, proc.returncode)
        return None

    async def _start_one(self) -> tuple[trio.Process, Path] | None:
        self._counter += 1
        path = self.directory / f"{self._counter}.sock"
        proc = await trio.lowlevel.open_process(spare_argv(str(path)), stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, start_new_session=True)
        with trio.move_on_after(READY_TIMEOUT_S):
            while not path.exists():
                if proc.returncode is not None:
                    break
                await trio.sleep(0.02)
            else:
                return proc, path
        log.error("pool: spare shim did not start (exit status %s)", proc.returncode)
        await _terminate(proc)
        return None


async def _terminate(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(STOP_GRACE_S):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _reap(proc: trio.Process) -> None:
    try:
        await proc.wait()
    except Exception:  # noqa: BLE001 (reaping is best effort; never take the pool down)
        pass
