"""The warm pool (issue #9): a shim adopts a ready VM, the pool refills, every clone is its own
machine, and no QEMU is left once the sandbox stops or its owner goes away, nor when the pool stops.
One cold boot (the template) and four restores; at most two VMs at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from shim.config import Config, FactoryConfig, HypervisorConfig, RuntimeConfig
from shim.factory.pool import Pool
from shim.factory.protocol import request
from shim.process import Container, Process
from shim.sandbox import VmSandbox
from shim.stdio import HostStdio
from tests.e2e.test_factory_templates import probe_bundle, run_probe
from tests.support.vmprocs import qemus_under

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
            owner.cancel_scope.cancel()
        await until(lambda: gone(adopted), 10, "the adopted QEMU to exit")
        await sandbox.stop()  # cleans the state dir (mounts, files); idempotent

        await wait_ready(pool, 1)
        nursery.cancel_scope.cancel()  # the pool stops: every VM it owns goes
    await until(lambda: not qemus_under(state), 10, "the pool's QEMUs to exit")
    assert not sock.exists()
