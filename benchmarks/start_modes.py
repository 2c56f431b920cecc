"""`ctr run --rm busybox true` through runc and kata-py cold / from a template [/ from the pool], side
by side in one run, with the per-phase breakdown and host memory per idle pod (issue #9).

    python3 benchmarks/start_modes.py [--runs 5] [--pods 5] [--pool-size 2] [--no-pool]

One private containerd (tests/support/containerd.py); kata-py's mode is switched between runs by
rewriting its config file (every shim reads it at start): cold = `[factory] template = false`;
template = a template cache in the run's temp dir, built by an uncounted warm-up run; pool = a
`kata-py pool` service started by this script (ready VMs, warmed up while they wait, and one spare
shim daemon for `start` to hand the pod to). Runs are interleaved so load hits every mode alike.
Memory: --pods `ctr run -d ... sleep 120` pods started from the template, then PSS of each pod's
shim + QEMU (/proc/<pid>/smaps_rollup). Takes /tmp/kata-py-vm.lock itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

from benchmarks._table import STATS_HEADERS, mib, proc_kib, stats_row, table, vm_lock  # noqa: E402
from benchmarks.ctr_run import (  # noqa: E402
    RUNC,
    ctr_run,
    progress,
    qemu_pid,
    reap_leftovers,
    schedule,
    shim_pid,
    timing_lines,
)
from tests.support.containerd import RUNTIME as KATA  # noqa: E402
from tests.support.containerd import PrivateContainerd  # noqa: E402

PHASES = ("vm_launch", "vm_restore", "pool_take", "agent_port", "agent_ready", "sandbox_create", "total")
# (label, timing line kind, field); "of which" rows are inside the Create row (not summed into "rest")
BREAKDOWN = (
    ("shim: `start` action", "shim", "start_cmd"),
    ("shim: daemon start-up", "shim", "daemon_init"),
    ("Create (incl. sandbox start below)", "lifecycle", "create"),
    ("  of which sandbox start", "sandbox", "total"),
    ("  of which agent CreateContainer", "container", "agent_create"),
    ("Create -> Start (ctr)", "lifecycle", "to_start"),
    ("Start", "lifecycle", "start"),
    ("Start -> exit", "lifecycle", "run"),
    ("exit -> Delete (ctr)", "lifecycle", "to_delete"),
    ("Delete", "lifecycle", "delete"),
)


def set_mode(ctd: PrivateContainerd, base: str, mode: str, templates: Path, pool_sock: Path) -> None:
    factory = {"cold": "template = false\n",
               "template": f'template_dir = "{templates}"\n',
               "pool": f'template_dir = "{templates}"\npool_socket = "{pool_sock}"\n'}[mode]
    ctd.kata_config.write_text(base + "[factory]\n" + factory)


def start_pool(ctd: PrivateContainerd, size: int, sock: Path) -> subprocess.Popen[bytes]:
    log = open(ctd.dir / "pool.log", "ab")  # noqa: SIM115 (kept open for the child's lifetime)
    proc = subprocess.Popen([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config), "pool",
                             "--socket", str(sock), "--size", str(size)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pool did not start: {(ctd.dir / 'pool.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def stop_everything(ctd: PrivateContainerd, pool: subprocess.Popen[bytes] | None) -> None:
    """The pool (it stops its VMs and spares), containerd, any shim or QEMU left, the temp dir."""
    if pool is not None:
        pool.terminate()
        pool.wait(timeout=60)
    ctd.stop()
    reap_leftovers(ctd)
    ctd.cleanup()


def memory_per_pod(ctd: PrivateContainerd, image: str, pods: int, hold: float) -> list[list[object]]:
    ids = [f"idle-{i}" for i in range(pods)]
    try:
        for cid in ids:
            ctd.ctr("run", "-d", "--runtime", KATA, image, cid, "sleep", "120", timeout=300)
        time.sleep(hold)
        rows = []
        for cid in ids:
            shim, qemu = shim_pid(KATA, cid), qemu_pid(ctd, cid)
            shim_pss = mib(proc_kib(f"/proc/{shim}/smaps_rollup", "Pss")) if shim else None
            qemu_pss = mib(proc_kib(f"/proc/{qemu}/smaps_rollup", "Pss")) if qemu else None
            total = shim_pss + qemu_pss if shim_pss is not None and qemu_pss is not None else None
            rows.append([cid, shim_pss, qemu_pss, total])
        return rows
    finally:
        for cid in ids:
            ctd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
            ctd.ctr("task", "delete", "-f", cid, check=False, timeout=120)
            ctd.ctr("container", "delete", cid, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="counted runs per mode (default 5)")
    parser.add_argument("--pods", type=int, default=5, help="idle pods for the memory table (default 5)")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--no-pool", action="store_true", help="leave out the pool mode")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds idle pods settle before PSS is read")
    args = parser.parse_args()
    modes = ["runc", "cold", "template"] + ([] if args.no_pool else ["pool"])
    with vm_lock():
        ctd = PrivateContainerd()
        pool = None
        try:
            base = ctd.kata_config.read_text()
            templates, pool_sock = ctd.dir / "templates", ctd.dir / "pool" / "pool.sock"
            ctd.start()
            image = ctd.import_busybox()
            set_mode(ctd, base, "template", templates, pool_sock)
            progress("building the template (`kata-py template build`, as at install time)")
            subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config), "template", "build"],
                           check=True, timeout=900)
            progress(f"warm-up: {ctr_run(ctd, image, KATA, 'warm-template'):.2f} s")
            ctr_run(ctd, image, RUNC, "warm-runc")
            if "pool" in modes:
                pool = start_pool(ctd, args.pool_size, pool_sock)
            latency: dict[str, list[float]] = {m: [] for m in modes}
            ids: dict[str, list[str]] = {m: [] for m in modes}
            for i, mode in enumerate(schedule({m: args.runs for m in modes})):
                if mode != "runc":
                    set_mode(ctd, base, mode, templates, pool_sock)
                    if mode == "pool":
                        time.sleep(2.0)  # let the pool refill: measure a warm pool, not its refill rate
                cid = f"{mode}-{i}"
                took = ctr_run(ctd, image, RUNC if mode == "runc" else KATA, cid)
                latency[mode].append(took)
                ids[mode].append(cid)
                progress(f"{cid}: {took:.2f} s")
            set_mode(ctd, base, "template", templates, pool_sock)
            memory = memory_per_pod(ctd, image, args.pods, args.hold)
            timings = timing_lines(ctd.log)
        finally:
            stop_everything(ctd, pool)
    print("\nctr run --rm busybox true, seconds (wall time of ctr)")
    print(table(STATS_HEADERS, [stats_row(m, latency[m]) for m in modes]))
    print("\nkata-py sandbox start phases, seconds (median; shim timing lines)")
    kata_modes = [m for m in modes if m != "runc"]
    rows = []
    for phase in PHASES:
        medians = []
        for m in kata_modes:
            row = stats_row(phase, [timings.get(("sandbox", cid), {}).get(phase) for cid in ids[m]])
            medians.append(row[1])
        rows.append([phase, *medians])
    print(table(["", *kata_modes], rows))
    print("\nwhere `ctr run` spends it, seconds (median; shim timing lines)")
    rows = []
    for label, kind, phase in BREAKDOWN:
        rows.append([label, *[stats_row(label, [timings.get((kind, cid), {}).get(phase) for cid in ids[m]])[1]
                              for m in kata_modes]])
    rest = []
    for m in kata_modes:
        gaps = []
        for cid, wall in zip(ids[m], latency[m], strict=True):
            parts = [timings.get((kind, cid), {}).get(phase) for _, kind, phase in BREAKDOWN if kind in ("shim", "lifecycle")]
            gaps.append(None if None in parts else wall - sum(p for p in parts if p is not None))
        rest.append(stats_row("rest", gaps)[1])
    rows.append(["rest: ctr, containerd, Shutdown, `delete`", *rest])
    rows.append(["ctr run --rm (wall)", *[stats_row("wall", latency[m])[1] for m in kata_modes]])
    print(table(["", *kata_modes], rows))
    print(f"\nhost memory per idle pod ({args.pods} pods from the template, `sleep 120`), PSS MiB")
    print(table(["pod", "shim", "QEMU", "total"], memory))
    totals = [r[3] for r in memory if r[3] is not None]
    if totals:
        print(table(STATS_HEADERS, [stats_row("shim + QEMU", totals)]))


if __name__ == "__main__":
    main()
