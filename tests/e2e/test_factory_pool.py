"""The warm pool (issue #9): a shim adopts a ready VM, the pool refills, every clone is its own
machine, and no QEMU is left once the sandbox stops or its owner goes away, nor when the pool stops.
One cold boot (the template) and four restores; at most two VMs at once.

Killed owners (issue #14): `delete` after a SIGKILLed shim kills the QEMU that shim took from the
pool (through containerd), and a pool started after a SIGKILLed one kills the VMs the dead one left,
and nothing it cannot prove is one of them. Both use the session's template (default shapes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from shim.config import Config, FactoryConfig, HypervisorConfig, RuntimeConfig
from shim.factory.pool import POOL_RECORD, Pool
from shim.factory.protocol import request
from shim.process import Container, Process
from shim.sandbox import VmSandbox
from shim.stdio import HostStdio
from tests.e2e.test_factory_templates import probe_bundle, run_probe
from tests.e2e.test_spare_shims import pool_status
from tests.support.containerd import RUNTIME, PrivateContainerd
from tests.support.vmprocs import qemus_under, wait_for
from vmm.procrecord import (
    QEMU_RECORD,
    ProcRecord,
    format_record,
    is_running,
    kill_recorded,
    read_record,
    write_record,
)

pytestmark = pytest.mark.vm


def gone(pid: int) -> bool:
    try:
        return b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return True


async def until(predicate, timeout: float, what: str) -> None:
    for _ in range(int(timeout * 10)):
        if predicate():
            return
        await trio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def wait_ready(pool: Pool, n: int, timeout: float = 60) -> None:
    await until(lambda: len(pool.ready) >= n, timeout, f"{n} ready VM(s)")


async def test_pool_hands_out_refills_and_leaves_no_qemu(tmp_path: Path):
    state = tmp_path / "s"
    sock = state / "pool" / "pool.sock"
    guest = Config().guest_dir().resolve()
    config = Config(hypervisor=HypervisorConfig(guest_dir=str(guest)), runtime=RuntimeConfig(state_dir=str(state)),
                    factory=FactoryConfig(template_dir=str(tmp_path / "templates"), pool_socket=str(sock),
                                          pool_size=1))
    bundle = probe_bundle(tmp_path)
    async with trio.open_nursery() as nursery:
        pool = Pool(config, sock, size=1)
        with trio.fail_after(180):
            await nursery.start(pool.serve)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"

        # a sandbox takes the ready VM; it is its own machine (clock, CRNG)
        boot, rand1, guest_clock, host_clock = await run_probe(config, "pool-a", bundle)
        assert boot == "pool"
        assert abs(guest_clock - host_clock) < 1.0
        await wait_ready(pool, 1)  # refilled in the background
        status = await request(str(sock), {"op": "status"}, timeout=5)
        assert status["ready"] == {pool.key: 1}

        boot, rand2, _, _ = await run_probe(config, "pool-b", bundle)
        assert boot == "pool" and rand2 != rand1
        await wait_ready(pool, 1)

        # the owner of an adopted VM goes away without stop(): its QEMU goes with it, and the pid
        # file `shim delete` uses after a shim crash is in the sandbox's state dir
        spec = json.loads((bundle / "config.json").read_text())
        async with trio.open_nursery() as owner:
            sandbox = VmSandbox("pool-c", config, owner)
            with trio.fail_after(60):
                await sandbox.create_container(Container("pool-c", str(bundle), spec, True,
                                                         Process("pool-c", "", HostStdio(False), False)))
            adopted = sandbox.pid()
            assert (sandbox.state_dir / "qemu.pid").read_text().strip() == str(adopted)
            recorded = read_record(sandbox.state_dir / QEMU_RECORD)  # what `delete` would kill
            assert recorded is not None and recorded.pid == adopted and is_running(recorded)
            owner.cancel_scope.cancel()
        await until(lambda: gone(adopted), 10, "the adopted QEMU to exit")
        await sandbox.stop()  # cleans the state dir (mounts, files); idempotent

        await wait_ready(pool, 1)
        nursery.cancel_scope.cancel()  # the pool stops: every VM it owns goes
    await until(lambda: not qemus_under(state), 10, "the pool's QEMUs to exit")
    assert not sock.exists()
    assert not (state / "pool" / "vms").exists()  # its VMs' directories and its record went too


# ---- killed owners (issue #14) ----------------------------------------------------------------
def spawn_pool(config: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    """`kata-py pool` with one VM and no spare shim, once that VM is ready."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shim.cli", "--config", str(config), "pool", "--socket",
                                 str(sock), "--size", "1", "--shims", "0"], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return sum(pool_status(sock)["ready"].values()) == 1  # type: ignore[union-attr]
        except (OSError, ValueError):  # not listening yet (or a killed predecessor's socket)
            return False

    try:
        wait_for(ready, timeout=180, what=f"pool {proc.pid} to have a VM ready")
    except BaseException:
        end(proc)
        raise
    return proc


def end(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def pool_vm(state: Path, pool_pid: int) -> ProcRecord:
    """The record of the one VM that pool keeps."""
    (path,) = (state / "pool" / "vms" / str(pool_pid)).glob(f"*/{QEMU_RECORD}")
    record = read_record(path)
    assert record is not None and is_running(record)
    return record


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes that stand in for a live pool and its VM: nothing may kill them."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.containerd
def test_delete_after_a_killed_shim_kills_the_qemu_it_took_from_the_pool(tmp_path: Path):
    sock = tmp_path / "pool" / "pool.sock"
    ctd = PrivateContainerd(kata_config=f'[factory]\npool_socket = "{sock}"\n').start()
    pool = None
    try:
        pool = spawn_pool(ctd.kata_config, sock, ctd.dir / "pool.log")
        image = ctd.import_busybox()
        ctd.ctr("run", "-d", "--runtime", RUNTIME, image, "pooled", "sleep", "600")
        try:
            state = ctd.kata_state / "sandboxes" / "pooled"
            wait_for(lambda: (state / QEMU_RECORD).exists() and b"boot=pool" in ctd.log.read_bytes(),
                     timeout=120, what="the sandbox to run on the pool's VM")
            assert re.search(r"timing sandbox=pooled .*boot=pool", ctd.log.read_text()), ctd.log_tail()
            record = read_record(state / QEMU_RECORD)
            assert record is not None and is_running(record)
            adopted = record.pid
            # the pool started it: its command line names the pool's paths, not the sandbox's
            assert str(state).encode() not in cmdline(adopted)
            shims = [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
                     if b"-m\x00shim\x00" in cmdline(int(p)) and b"-id\x00pooled" in cmdline(int(p))]
            assert shims, "shim process not found"
            for shim_pid in shims:
                os.kill(shim_pid, signal.SIGKILL)
            # containerd notices the dead shim and runs our `delete`, which kills the recorded QEMU
            # (the pool, its parent, reaps it)
            wait_for(lambda: gone(adopted), timeout=30, what=f"`delete` to kill the adopted QEMU {adopted}")
            wait_for(lambda: not state.exists(), timeout=30, what="`delete` to remove the sandbox's state")
        finally:
            ctd.ctr("tasks", "delete", "-f", "pooled", check=False)
            ctd.ctr("containers", "delete", "pooled", check=False)
        assert qemus_under(ctd.kata_state / "pool"), "the pool's refilled VM"
        assert end(pool) == 0
        pool = None
        assert not qemus_under(ctd.kata_state)
    finally:
        if pool is not None:
            end(pool)
        ctd.cleanup()


def test_a_new_pool_kills_the_vms_of_a_killed_pool_and_nothing_else(tmp_path: Path, sleepers):
    state = tmp_path / "s"
    sock = state / "pool" / "pool.sock"
    config = tmp_path / "kata-py.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state}"\n[factory]\npool_socket = "{sock}"\n')
    vms = state / "pool" / "vms"
    log = tmp_path / "pool.log"
    first = spawn_pool(config, sock, log)
    second = None
    try:
        left = pool_vm(state, first.pid)
        # a live pool of another socket and its VM (stand-ins): never touched
        sleepers += [subprocess.Popen(["sleep", "600"]) for _ in range(3)]
        live_pool, live_vm, reused = sleepers
        (vms / str(live_pool.pid) / "1").mkdir(parents=True)
        write_record(vms / str(live_pool.pid) / POOL_RECORD, live_pool.pid)
        write_record(vms / str(live_pool.pid) / "1" / QEMU_RECORD, live_vm.pid)
        # a dead pool whose VM's pid now belongs to another process (other start time): not killed
        other = vms / str(int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)  # no pool has this pid
        (other / "1").mkdir(parents=True)
        gone_pool = subprocess.Popen(["sleep", "600"])
        write_record(other / POOL_RECORD, gone_pool.pid)
        end(gone_pool, signal.SIGKILL)
        now = write_record(other / "1" / QEMU_RECORD, reused.pid)
        (other / "1" / QEMU_RECORD).write_text(format_record(ProcRecord(now.pid, now.start_ticks + 1, now.boot_id)))

        assert end(first, signal.SIGKILL) == -signal.SIGKILL
        assert is_running(left)  # nothing tells a QEMU that its pool died: it would run forever

        second = spawn_pool(config, sock, log)
        assert gone(left.pid), f"the killed pool's QEMU {left.pid} still runs"
        assert not (vms / str(first.pid)).exists()
        assert not other.exists()
        assert all(p.poll() is None for p in sleepers), "a process that is not a dead pool's VM was killed"
        assert sorted(os.listdir(vms / str(live_pool.pid))) == ["1", POOL_RECORD]
        mine = pool_vm(state, second.pid)
        assert f"killed QEMU pid {left.pid} of dead pool {first.pid}" in log.read_text()

        assert end(second) == 0
        second = None
        assert not is_running(mine)
        assert sorted(os.listdir(vms)) == [str(live_pool.pid)]  # the stopped pool removed its own only
        assert not qemus_under(state)
    finally:
        for proc in (first, second):
            if proc is not None:
                end(proc)
        for record in vms.glob(f"*/*/{QEMU_RECORD}"):  # whatever a failure left running
            kill_recorded(record)
