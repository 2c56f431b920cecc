"""`ctr run --rm busybox true`: runc vs kata-py, side by side against one private containerd (issue #5).

    python3 benchmarks/ctr_run.py [--kata 5] [--runc 10] [--null-io 3] [--warmup 1] [--hold 3]

Starts a private containerd 1.6 (tests/support/containerd.py) with the local busybox image, then runs
`ctr run --rm <image> <id> true` with --runtime io.containerd.runc.v2 and io.containerd.kata-py.v2,
plus --null-io runs of kata-py with `ctr run --null-io` (no stdio fifos), all runs interleaved so that
load from other work hits every variant alike, after --warmup uncounted runs of runc and kata-py.
Latency is the wall time of the `ctr` process. The kata-py breakdown comes from the shim's
`timing sandbox=...` / `timing container=...` lines in containerd's log, and from the times containerd
logs the task events it forwards (runs are sequential, so the events after a container's timing line
are that container's).

Memory: `ctr run -d ... sleep 30` with each runtime; after --hold seconds, VmRSS of the shim daemon
(/proc/<pid>/status) and, for kata-py, QEMU's Rss/Pss (/proc/<pid>/smaps_rollup); then the task is
killed and deleted. Takes /tmp/kata-py-vm.lock itself (no need to wrap it in flock).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

from benchmarks._table import (  # noqa: E402
    STATS_HEADERS,
    cmdline,
    find_pids,
    mib,
    proc_kib,
    stats_row,
    table,
    vm_lock,
)
from tests.support.containerd import RUNTIME as KATA  # noqa: E402
from tests.support.containerd import PrivateContainerd  # noqa: E402

RUNC = "io.containerd.runc.v2"
NAMES = {RUNC: "runc", KATA: "kata-py"}
KATA_NULL_IO = "kata-py --null-io"  # a variant: the same runtime with ctr's --null-io (no stdio fifos)
TIMING = re.compile(r"timing (shim|sandbox|container|lifecycle)=([\w.-]+) ((?:\w+=[\w.]+ ?)+)")
EVENT = re.compile(r'time="([\d-]+T[\d:]+\.\d{6})\d*Z".*msg="event forwarded".*topic=/tasks/(start|exit|delete) ')
CONTAINER_TIMING = re.compile(r"timing container=([\w.-]+) ")
SANDBOX_PHASES = ("vm_launch", "agent_port", "agent_ready", "sandbox_create")
CONTAINER_PHASES = ("rootfs", "agent_create")


@dataclass
class Runs:
    latency: dict[str, list[float]] = field(default_factory=lambda: {RUNC: [], KATA: [], KATA_NULL_IO: []})
    kata_ids: list[str] = field(default_factory=list)


def schedule(counts: dict[str, int]) -> list[str]:
    """Every variant's runs spread evenly over the session (by fraction of each one's count)."""
    runs = [((i + 0.5) / n, variant) for variant, n in counts.items() for i in range(n)]
    return [variant for _, variant in sorted(runs)]


def ctr_run(ctd: PrivateContainerd, image: str, variant: str, cid: str) -> float:
    """Wall seconds of one `ctr run --rm [--null-io] <image> <cid> true`. Raises AssertionError if it fails."""
    runtime, extra = (KATA, ["--null-io"]) if variant == KATA_NULL_IO else (variant, [])
    t0 = time.monotonic()
    ctd.ctr("run", "--rm", *extra, "--runtime", runtime, image, cid, "true", timeout=300)
    return time.monotonic() - t0


def latency_runs(ctd: PrivateContainerd, image: str, counts: dict[str, int], warmup: int) -> Runs:
    runs = Runs()
    for i in range(warmup):
        for runtime in (RUNC, KATA):
            took = ctr_run(ctd, image, runtime, f"warm-{NAMES[runtime]}-{i}")
            progress(f"warm-up {NAMES[runtime]}: {took:.2f} s")
    for i, variant in enumerate(schedule({v: n for v, n in counts.items() if n > 0})):
        cid = f"{NAMES.get(variant, 'kata-py-null-io')}-{i}"
        took = ctr_run(ctd, image, variant, cid)
        runs.latency[variant].append(took)
        if variant == KATA:
            runs.kata_ids.append(cid)
        progress(f"{cid}: {took:.2f} s")
    return runs


def timing_lines(log: Path) -> dict[tuple[str, str], dict[str, float]]:
    """{(kind, id): {phase: seconds}} from the shim's structured timing lines."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for match in TIMING.finditer(log.read_text(errors="replace")):
        fields = dict(kv.split("=", 1) for kv in match.group(3).split())
        out[(match.group(1), match.group(2))] = {k: float(v) for k, v in fields.items() if _is_number(v)}
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def event_times(log: Path) -> dict[str, dict[str, datetime]]:
    """{cid: {"start"|"exit"|"delete": when containerd forwarded that task event}} for kata-py containers."""
    out: dict[str, dict[str, datetime]] = {}
    current: str | None = None
    for line in log.read_text(errors="replace").splitlines():
        if match := CONTAINER_TIMING.search(line):
            current = match.group(1)
            out[current] = {}
        elif current is not None and (match := EVENT.search(line)):
            out[current].setdefault(match.group(2), datetime.fromisoformat(match.group(1)))
            if match.group(2) == "delete":
                current = None
    return out


def gap(events: dict[str, datetime], first: str, then: str) -> float | None:
    if first in events and then in events:
        return (events[then] - events[first]).total_seconds()
    return None


def breakdown_rows(runs: Runs, log: Path) -> list[list[object]]:
    timings = timing_lines(log)
    events = [event_times(log).get(cid, {}) for cid in runs.kata_ids]
    wall = dict(zip(runs.kata_ids, runs.latency[KATA], strict=True))
    sandboxes = [timings.get(("sandbox", cid), {}) for cid in runs.kata_ids]
    containers = [timings.get(("container", cid), {}) for cid in runs.kata_ids]
    rows = [stats_row(f"sandbox: {p}", [s.get(p) for s in sandboxes]) for p in SANDBOX_PHASES]
    rows.append(stats_row("sandbox: total (VmSandbox.start)", [s.get("total") for s in sandboxes]))
    rows += [stats_row(f"container: {p}", [c.get(p) for c in containers]) for p in CONTAINER_PHASES]
    rest = [wall[cid] - s["total"] - c["total"] for cid, s, c in zip(runs.kata_ids, sandboxes, containers,
                                                                    strict=True) if "total" in s and "total" in c]
    rows.append(stats_row("rest: ctr, containerd, shim spawn, start, exit, delete, VM stop", rest))
    rows.append(stats_row("  of which: TaskStart -> TaskExit event", [gap(e, "start", "exit") for e in events]))
    rows.append(stats_row("  of which: TaskExit -> TaskDelete event", [gap(e, "exit", "delete") for e in events]))
    rows.append(stats_row("ctr run --rm (wall)", runs.latency[KATA]))
    return rows


# ---- memory while a container runs ------------------------------------------------------------------
def shim_pid(runtime: str, cid: str) -> int | None:
    """The long-lived shim of `cid` (the kata-py daemon runs as `python -m shim ... -id <cid>`)."""
    needle = "containerd-shim-runc-v2" if runtime == RUNC else "-m shim"
    for pid in find_pids(needle, cid):
        args = cmdline(pid)
        if "-id" in args and args[args.index("-id") + 1] == cid and "start" not in args and "delete" not in args:
            return pid
    return None


def qemu_pid(ctd: PrivateContainerd, cid: str) -> int | None:
    pids = find_pids("qemu-system", f"{ctd.kata_state}/sandboxes/{cid}/")
    return pids[0] if pids else None


def memory_sample(ctd: PrivateContainerd, image: str, runtime: str, hold: float) -> dict[str, float | None]:
    cid = f"mem-{NAMES[runtime]}"
    ctd.ctr("run", "-d", "--runtime", runtime, image, cid, "sleep", "30", timeout=300)
    try:
        time.sleep(hold)
        shim = shim_pid(runtime, cid)
        sample = {"shim VmRSS": mib(proc_kib(f"/proc/{shim}/status", "VmRSS")) if shim else None}
        if runtime == KATA:
            qemu = qemu_pid(ctd, cid)
            smaps = f"/proc/{qemu}/smaps_rollup"
            sample["QEMU Rss"] = mib(proc_kib(smaps, "Rss")) if qemu else None
            sample["QEMU Pss"] = mib(proc_kib(smaps, "Pss")) if qemu else None
        return sample
    finally:
        ctd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        ctd.ctr("task", "delete", "-f", cid, check=False, timeout=120)
        ctd.ctr("container", "delete", cid, check=False)


# ---- leaks ---------------------------------------------------------------------------------------
def leftovers(ctd: PrivateContainerd) -> list[int]:
    """QEMUs and shims this run started that are still alive (their command lines name ctd.dir)."""
    return [p for p in find_pids(str(ctd.dir)) if p != (ctd.proc.pid if ctd.proc else None)]


def reap_leftovers(ctd: PrivateContainerd) -> None:
    for pid in leftovers(ctd):
        print(f"warning: killing leftover pid {pid}: {' '.join(cmdline(pid))[:120]}", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- report ----------------------------------------------------------------------------------------
def report(runs: Runs, log: Path, memory: dict[str, dict[str, float | None]]) -> None:
    runc, kata = runs.latency[RUNC], runs.latency[KATA]
    print("\nctr run --rm busybox true, seconds (wall time of ctr)")
    null_io = runs.latency[KATA_NULL_IO]
    print(table(STATS_HEADERS, [stats_row("runc (io.containerd.runc.v2)", runc),
                                stats_row("kata-py (io.containerd.kata-py.v2)", kata),
                                stats_row("kata-py, ctr run --null-io", null_io)]))
    print(f"\nkata-py / runc, median: {statistics.median(kata) / statistics.median(runc):.1f}x")
    if null_io:
        print(f"kata-py --null-io / runc, median: {statistics.median(null_io) / statistics.median(runc):.1f}x")
    print("\nkata-py breakdown, seconds (shim timing lines; 'rest' = wall - sandbox total - container total)")
    print(table(STATS_HEADERS, breakdown_rows(runs, log)))
    print("\nmemory while `sleep 30` runs, MiB")
    rows = [[f"{NAMES[rt]}: {what}", value] for rt, sample in memory.items() for what, value in sample.items()]
    print(table(("", "MiB"), rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kata", type=int, default=5, help="kata-py runs (default 5)")
    parser.add_argument("--runc", type=int, default=10, help="runc runs (default 10)")
    parser.add_argument("--null-io", type=int, default=3, help="extra kata-py runs with ctr's --null-io "
                        "(no stdin/stdout fifos; default 3, 0 to skip)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs of each runtime first (default 1)")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds a running container settles before "
                        "memory is read (default 3)")
    args = parser.parse_args()
    with vm_lock():
        ctd = PrivateContainerd()
        try:
            ctd.start()
            image = ctd.import_busybox()
            counts = {RUNC: args.runc, KATA: args.kata, KATA_NULL_IO: args.null_io}
            runs = latency_runs(ctd, image, counts, args.warmup)
            memory = {rt: memory_sample(ctd, image, rt, args.hold) for rt in (RUNC, KATA)}
            report(runs, ctd.log, memory)
        finally:
            ctd.stop()
            reap_leftovers(ctd)
            ctd.cleanup()


if __name__ == "__main__":
    main()
