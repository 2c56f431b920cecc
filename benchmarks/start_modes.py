"""`ctr run --rm busybox true` through runc and kata-py cold / from a template [/ from the pool], side
by side in one run, with the per-phase breakdown and host memory per idle pod (issue #9).

    python3 benchmarks/start_modes.py [--runs 5] [--pods 5] [--pool-size 2] [--no-pool] [--baseline REV]

One private containerd (tests/support/containerd.py); kata-py's mode is switched between runs by
rewriting its config file (every shim reads it at start): cold = `[factory] template = false`;
template = a template cache in the run's temp dir, built by an uncounted warm-up run; pool = a
`kata-py pool` service started by this script (ready VMs, warmed up while they wait, and one spare
shim daemon for `start` to hand the pod to). Runs are interleaved so load hits every mode alike.
Memory: --pods `ctr run -d ... sleep 120` pods started from the template, then PSS of each pod's
shim + QEMU (/proc/<pid>/smaps_rollup). Takes /tmp/kata-py-vm.lock itself.

--baseline REV: the same modes also for kata-py at git revision REV, in the same containerd and the
same rounds (`cold@REV` next to `cold@HEAD`, and so on), to see whether a change made starts slower.
REV is checked out with `git worktree add --detach` in the run's temp dir (removed at the end) and
registered as a second runtime, io.containerd.kata-py-base.v2 (containerd finds the shim binary
containerd-shim-kata-py-base-v2 on its PATH by that name). Each tree runs with PYTHONPATH set to
itself, its own guest (built by its own packaging/guest/build_guest.py, REV's into a cache of its
own, /var/cache/kata-py/guest-baseline; named in each config as guest_dir; the guest cache's
`current` is put back as it was), state dir, template cache and pool.
The memory table is HEAD's only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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

REPO = Path(__file__).resolve().parents[1]
BASELINE_RUNTIME = "io.containerd.kata-py-base.v2"
GUEST_CACHE = Path(os.environ.get("KATA_PY_GUEST_CACHE", "/var/cache/kata-py/guest"))
# baseline guests have a cache of their own: in the shared one each would push a guest another session
# may still use out of the newest few that build_guest.py keeps
BASELINE_GUEST_CACHE = GUEST_CACHE.with_name(GUEST_CACHE.name + "-baseline")
POOL_REFILL_S = 2.0  # per pool, before a pool run: measure a warm pool, not its (or the other's) refill

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


@dataclass
class Side:
    """One kata-py tree under test: the runtime name ctr asks for, its config, template cache, pool."""

    name: str  # "" when there is one tree; else "HEAD" or the baseline revision (column suffix)
    runtime: str
    config: Path
    base: str  # config text before [factory]
    templates: Path
    pool_sock: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))  # for its kata-py commands
    tree: Path | None = None  # run from this tree (PYTHONPATH); None: as PrivateContainerd runs kata-py
    pool: subprocess.Popen[bytes] | None = None

    def variant(self, mode: str) -> str:
        return f"{mode}@{self.name}" if self.name else mode


def container_id(*parts: str) -> str:
    """containerd ids are [A-Za-z0-9]+ joined by single [._-]: "cold@HEAD+uncommitted", "3" -> cold-HEAD-uncommitted-3."""
    return "-".join(p.replace("@", "-").replace("+", "-") for p in parts if p)


def set_mode(side: Side, mode: str) -> None:
    factory = {"cold": "template = false\n",
               "template": f'template_dir = "{side.templates}"\n',
               "pool": f'template_dir = "{side.templates}"\npool_socket = "{side.pool_sock}"\n'}[mode]
    side.config.write_text(side.base + "[factory]\n" + factory)


def kata_py(side: Side, *args: str) -> list[str]:
    return [sys.executable, "-m", "shim.cli", "--config", str(side.config), *args]


def start_pool(ctd: PrivateContainerd, side: Side, size: int) -> subprocess.Popen[bytes]:
    path = ctd.dir / f"pool{'-' + side.name if side.name else ''}.log"
    log = open(path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
    proc = subprocess.Popen([*kata_py(side), "pool", "--socket", str(side.pool_sock), "--size", str(size)],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=side.env)
    deadline = time.monotonic() + 180
    while not side.pool_sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pool did not start: {path.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def stop_everything(ctd: PrivateContainerd, sides: list[Side], worktree: Path | None) -> None:
    """The pools (they stop their VMs and spares), containerd, any shim or QEMU left, the baseline's
    worktree, the temp dir."""
    for side in sides:
        if side.pool is not None:
            side.pool.terminate()
            side.pool.wait(timeout=60)
    ctd.stop()
    reap_leftovers(ctd)
    if worktree is not None and worktree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
    ctd.cleanup()


# ---- --baseline: a second tree in the same containerd -------------------------------------------
def head_name() -> str:
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return "HEAD+uncommitted" if dirty else "HEAD"


@contextmanager
def guest_cache_current_kept() -> Iterator[None]:
    """Each build points the cache's `current` at what it built; put back what the machine had."""
    link = GUEST_CACHE / "current"
    before = os.readlink(link) if link.is_symlink() else None
    try:
        yield
    finally:
        if before is not None and (GUEST_CACHE / before).is_dir() and os.readlink(link) != before:
            tmp = GUEST_CACHE / f".current-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(before)
            os.replace(tmp, link)


def build_guest(tree: Path, cache: Path) -> Path:
    """That tree's guest, by its own build script (cached by content hash: seconds when built before)."""
    progress(f"guest of {tree}: packaging/guest/build_guest.py --out-root {cache}")
    out = subprocess.run([sys.executable, "packaging/guest/build_guest.py", "--out-root", str(cache), "--print-dir"],
                         cwd=tree, stdout=subprocess.PIPE, text=True, check=True, timeout=3600).stdout
    return Path(out.split()[-1])


def tree_side(ctd: PrivateContainerd, name: str, runtime: str, tree: Path, guest: Path) -> Side:
    """A side that runs kata-py from `tree` (PYTHONPATH, never the venv's editable install) with its own
    config, state dir and guest."""
    state = ctd.dir / ("k" if runtime == KATA else "kb")  # short: AF_UNIX paths
    config = ctd.kata_config if runtime == KATA else ctd.dir / "kata-py-base.toml"
    base = f'[runtime]\nstate_dir = "{state}"\ndebug = true\n[hypervisor]\nguest_dir = "{guest}"\n'
    env = {**os.environ, "PYTHONPATH": str(tree), "KATA_PY_CONFIG": str(config)}
    return Side(name, runtime, config, base, ctd.dir / f"templates-{name}", ctd.dir / f"pool-{name}" / "pool.sock",
                env, tree)


def write_shim_wrapper(ctd: PrivateContainerd, side: Side) -> None:
    """What containerd runs for `ctr run --runtime io.containerd.<x>.<v>`: containerd-shim-<x>-<v> from
    its PATH, no config entry needed. No `cd`: the shim takes the bundle from its working directory."""
    _, _, x, v = side.runtime.split(".")
    wrapper = ctd.bin / f"containerd-shim-{x}-{v}"
    wrapper.write_text(f"#!/bin/sh\nKATA_PY_CONFIG={side.config} PYTHONPATH={side.tree} "
                       f"exec {sys.executable} -m shim \"$@\"\n")
    wrapper.chmod(0o755)


def baseline_sides(ctd: PrivateContainerd, rev: str, worktree: Path) -> list[Side]:
    """[REV, HEAD] sides; REV checked out at `worktree`, in the run's temp dir (stop_everything removes it)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), rev], check=True)
    with guest_cache_current_kept():
        guests = build_guest(worktree, BASELINE_GUEST_CACHE), build_guest(REPO, GUEST_CACHE)
    progress(f"guests: {rev} {guests[0]}, HEAD {guests[1]}")
    return [tree_side(ctd, rev, BASELINE_RUNTIME, worktree, guests[0]),
            tree_side(ctd, head_name(), KATA, REPO, guests[1])]


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
    parser.add_argument("--baseline", metavar="REV", help="also run every mode with kata-py at git revision REV "
                        "(a worktree, its own guest, template and pool), side by side with this tree")
    args = parser.parse_args()
    modes = ["runc", "cold", "template"] + ([] if args.no_pool else ["pool"])
    with vm_lock():
        ctd = PrivateContainerd()
        worktree = ctd.dir / "baseline" if args.baseline else None
        sides: list[Side] = []
        try:
            if worktree is not None:
                sides = baseline_sides(ctd, args.baseline, worktree)
            else:  # the one tree, as PrivateContainerd runs it (its wrapper, its config)
                sides = [Side("", KATA, ctd.kata_config, ctd.kata_config.read_text(), ctd.dir / "templates",
                              ctd.dir / "pool" / "pool.sock")]
            ctd.start()
            for side in sides:
                if side.tree is not None:  # after start(): it writes its own wrapper for KATA
                    write_shim_wrapper(ctd, side)
            head = sides[-1]
            image = ctd.import_busybox()
            for side in sides:
                set_mode(side, "template")
                progress(f"building the template{' of ' + side.name if side.name else ''} (`kata-py template build`)")
                subprocess.run([*kata_py(side), "template", "build"], check=True, timeout=900, env=side.env)
                progress(f"warm-up: {ctr_run(ctd, image, side.runtime, container_id('warm-template', side.name)):.2f} s")
            ctr_run(ctd, image, RUNC, "warm-runc")
            if "pool" in modes:
                for side in sides:
                    side.pool = start_pool(ctd, side, args.pool_size)
            variants = ["runc", *[side.variant(m) for m in modes if m != "runc" for side in sides]]
            latency: dict[str, list[float]] = {v: [] for v in variants}
            ids: dict[str, list[str]] = {v: [] for v in variants}
            seen = dict.fromkeys(modes, 0)
            i = 0
            for mode in schedule({m: args.runs for m in modes}):
                # sides take turns going first, so neither always runs right after the other
                order = sides if seen[mode] % 2 == 0 else sides[::-1]
                seen[mode] += 1
                for side in [None] if mode == "runc" else order:
                    if side is not None:
                        set_mode(side, mode)
                        if mode == "pool":
                            time.sleep(POOL_REFILL_S * len(sides))
                    variant = "runc" if side is None else side.variant(mode)
                    cid = container_id(variant, str(i))
                    i += 1
                    took = ctr_run(ctd, image, RUNC if side is None else side.runtime, cid)
                    latency[variant].append(took)
                    ids[variant].append(cid)
                    progress(f"{cid}: {took:.2f} s")
            set_mode(head, "template")
            memory = memory_per_pod(ctd, image, args.pods, args.hold)
            timings = timing_lines(ctd.log)
        finally:
            stop_everything(ctd, sides, worktree)
    print("\nctr run --rm busybox true, seconds (wall time of ctr)")
    print(table(STATS_HEADERS, [stats_row(v, latency[v]) for v in variants]))
    print("\nkata-py sandbox start phases, seconds (median; shim timing lines)")
    kata_modes = [v for v in variants if v != "runc"]
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
