"""Hot-plug latency (issue #6): vCPUs and memory, QMP call to online in the guest, per mechanism.

    python3 benchmarks/hotplug.py [-n 3]

Boots one sandbox VM per memory mechanism (pc-dimm, virtio-mem) through the shim's own VmSandbox,
then times, N times each: grow 1 → 2 vCPUs (QMP device_add, then the agent's OnlineCPUMem until the
guest reports 2 online), shrink back (device_del until DEVICE_DELETED), grow memory by 256 MiB (QMP,
then OnlineCPUMem until MemTotal grew), and shrink it again where the mechanism allows.
Takes /tmp/kata-py-vm.lock itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

import trio  # noqa: E402

from benchmarks._table import STATS_HEADERS, stats_row, table, vm_lock  # noqa: E402
from shim.config import Config, HypervisorConfig, RuntimeConfig  # noqa: E402
from shim.sandbox import VmSandbox  # noqa: E402

GROW_MIB = 256
SETTLE_S = 3.0  # a CPU unplugged right after it came online was never ejected (see README)


async def measure(mechanism: str, runs: int, work: Path) -> list[list[object]]:
    config = Config(hypervisor=HypervisorConfig(memory_hotplug=mechanism),
                    runtime=RuntimeConfig(state_dir=str(work / mechanism)))
    times: dict[str, list[float]] = {}

    def record(name: str, t0: float) -> None:
        times.setdefault(name, []).append(time.monotonic() - t0)

    async with trio.open_nursery() as nursery:
        sandbox = VmSandbox(f"hotplug-{mechanism}", config, nursery)
        try:
            await sandbox.start({"hostname": "hotplug"})
            vm, agent = sandbox._vm, sandbox.agent
            assert vm is not None
            base = config.hypervisor.default_memory_mib
            for _ in range(runs):
                before = (await agent.guest_details()).mem_total_bytes
                t0 = time.monotonic()
                await vm.resize_memory(base + GROW_MIB)
                record(f"memory +{GROW_MIB} MiB: QMP", t0)
                while True:
                    now = (await agent.online_cpu_mem(nb_cpus=0, wait=False)).mem_total_bytes
                    if now >= before + (GROW_MIB - 8) * (1 << 20):
                        break
                    await trio.sleep(0.01)
                record(f"memory +{GROW_MIB} MiB: online in guest", t0)
                t0 = time.monotonic()
                got = await vm.resize_memory(base)
                record(f"memory -{GROW_MIB} MiB: {'done' if got == base else f'stuck at {got} MiB'}", t0)
            for n in range(2, 2 + runs):  # one new slot per run: slots are never reused after removal
                t0 = time.monotonic()
                await vm.resize_vcpus(n)
                record("vCPU +1: QMP device_add", t0)
                online = await agent.online_cpu_mem(nb_cpus=n, wait=True)
                record("vCPU +1: online in guest", t0)
                assert online.online_cpus == n, online
            # last, since it is the step QEMU 7.2 under TCG has been seen to crash on
            await trio.sleep(SETTLE_S)
            t0 = time.monotonic()
            got = await vm.resize_vcpus(runs)
            # vmm waits unplug_timeout (15 s) for DEVICE_DELETED, then reports what is present
            record(f"vCPU -1: guest eject ({'completed' if got == runs else 'not completed'})", t0)
        finally:
            with trio.CancelScope(shield=True):
                await sandbox.stop()
            nursery.cancel_scope.cancel()
    return [stats_row(f"{mechanism}: {name}", values) for name, values in times.items()]


async def main_async(runs: int) -> None:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="kp-hotplug-") as work:
        for mechanism in ("pc-dimm", "virtio-mem"):
            try:
                rows += await measure(mechanism, runs, Path(work))
            except Exception as exc:  # one mechanism failing must not hide the other's figures
                rows.append([f"{mechanism}: failed: {exc}"[:100], None, None, None, 0])
    print(f"\nhot-plug latency, seconds ({runs} run(s) each, TCG)")
    print(table(STATS_HEADERS, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3, help="runs per measurement")
    args = parser.parse_args()
    with vm_lock():
        trio.run(main_async, args.n)


if __name__ == "__main__":
    main()
