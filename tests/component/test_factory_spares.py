"""SpareShims with stand-in spares (sh): a spare handed out is reaped by run()'s own nursery while the
pool runs (no system task), and the spares nobody took are terminated when run() ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from shim.factory import spares as spares_mod
from shim.factory.spares import SpareShims


def stand_in(socket: str) -> list[str]:
    # a spare "listens" (its socket appears), then lives until told to go (the go file) or terminated
    return ["sh", "-c", 'touch "$1"; while [ ! -e "$1.go" ]; do sleep 0.02; done', "spare", socket]


def reaped(pid: int) -> bool:
    """Gone from /proc: exited and waited for (a zombie nobody waits for stays there)."""
    return not Path(f"/proc/{pid}").exists()


async def eventually(cond: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await trio.sleep(0.02)
    raise AssertionError(what)


async def test_a_taken_spare_is_reaped_and_the_rest_terminated(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares_mod, "spare_argv", stand_in)
    shims = SpareShims(tmp_path / "spares", 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(shims.run)
        assert len(shims.ready) == 2
        (taken_proc, _), (kept_proc, _) = shims.ready
        taken = shims.take()
        assert taken is not None and taken == str(shims.directory / "1.sock")
        Path(taken + ".go").touch()  # the pod's daemon exits: run()'s reaper must wait for it
        # (never poll the Process here: reading its returncode would reap it ourselves)
        await eventually(lambda: reaped(taken_proc.pid), "the spare handed out was never reaped")
        await eventually(lambda: len(shims.ready) == 2, "the pool did not refill")
        nursery.cancel_scope.cancel()
    assert reaped(kept_proc.pid), "a spare nobody took outlived the pool"
    assert not shims.ready and not (tmp_path / "spares").exists()
    assert shims.take() is None
