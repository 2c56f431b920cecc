"""vmm.qmp against a real QEMU (paused, -S): errors, events, and failure of pending calls."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vmm.errors import QmpDisconnected, QmpError, QmpTimeout
from vmm.qmp import QmpClient, open_qmp

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")


@pytest.fixture
async def qemu() -> AsyncIterator[tuple[trio.Process, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix="kp-qmp-", dir="/tmp"))
    sock = tmp / "qmp.sock"
    proc = await trio.lowlevel.open_process(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-no-user-config", "-display", "none",
         "-machine", "q35", "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL)
    try:
        yield proc, sock
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def qmp(qemu) -> AsyncIterator[QmpClient]:
    async with open_qmp(qemu[1]) as client:  # also covers "socket not there yet": QEMU just started
        yield client


async def test_execute_and_error_class(qmp: QmpClient) -> None:
    assert (await qmp.execute("query-status"))["status"] == "prelaunch"
    with pytest.raises(QmpError) as info:
        await qmp.execute("device_del", {"id": "nope"})
    err = info.value
    assert (err.command, err.arguments, err.error_class) == ("device_del", {"id": "nope"}, "DeviceNotFound")
    assert "nope" in err.desc
    # The flat object-add form (protocols.md §7): what our memory hotplug sends.
    await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": 1 << 20})


async def test_events_are_delivered_to_subscribers(qmp: QmpClient) -> None:
    with qmp.listen("RESUME") as resumes, qmp.listen() as everything:
        await qmp.execute("cont")
        with trio.fail_after(5):
            assert (await resumes.__anext__()).name == "RESUME"
            assert (await everything.__anext__()).name == "RESUME"
        await qmp.execute("stop")
        with trio.fail_after(5):
            stop = await everything.__anext__()
        assert stop.name == "STOP" and stop.timestamp > 0
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(qmp.execute, "cont")
            assert (await qmp.wait_for_event("RESUME", timeout=5)).name == "RESUME"
    await qmp.execute("stop")


async def test_timeout_and_pending_calls_fail_on_kill(qemu, qmp: QmpClient) -> None:
    proc, _ = qemu
    proc.send_signal(signal.SIGSTOP)  # QEMU stops answering
    with pytest.raises(QmpTimeout):
        await qmp.execute("query-status", timeout=0.2)
    with pytest.raises(QmpTimeout):
        await qmp.wait_for_event("RESUME", timeout=0.1)

    failures: list[BaseException] = []

    async def pending(call) -> None:
        try:
            await call()
        except QmpDisconnected as e:
            failures.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(pending, lambda: qmp.execute("query-status", timeout=60))
            n.start_soon(pending, lambda: qmp.wait_for_event("SHUTDOWN", timeout=60))
            await trio.sleep(0.1)
            proc.kill()
        await qmp.disconnected.wait()
    assert len(failures) == 2
    with pytest.raises(QmpDisconnected):
        await qmp.execute("query-status")


async def test_connect_timeout_when_nobody_listens() -> None:
    with pytest.raises(QmpDisconnected, match="cannot connect"):
        await open_qmp("/tmp/kp-qmp-nonexistent.sock", connect_timeout=0.1).__aenter__()


async def test_an_error_in_the_session_body_comes_out_bare(qemu) -> None:
    # open_qmp's loop and nursery must not hand callers a group of one (trio >= 0.25 nurseries would)
    with pytest.raises(QmpError, match="nope"):
        async with open_qmp(qemu[1]) as client:
            await client.execute("device_del", {"id": "nope"})
