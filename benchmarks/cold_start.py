"""Cold start of one sandbox VM, phase by phase (issue #4).

    python3 benchmarks/cold_start.py [-n 3] [--settle 1.0] [--keep-console]

Boots the sandbox VM N times through `shim.sandbox.VmSandbox` (the shim's own start script: QEMU,
agent port, health check, CreateSandbox), then creates and starts one busybox container whose rootfs
is a host directory shared through the sandbox's 9p share, exactly as the shim does for `ctr run`.
Every time is measured from the call to `VmSandbox.start()` (QEMU is spawned a few ms later).
Console markers are time-stamped when this script sees them in the VM's console log (polled every
10 ms). Between "sandbox ready" and creating the container the VM sits idle for --settle seconds
while QEMU's memory is read; that pause is taken out of the later times.

Takes /tmp/kata-py-vm.lock itself (no need to wrap it in flock).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

import trio  # noqa: E402

from benchmarks._table import STATS_HEADERS, mib, proc_kib, stats_row, table, vm_lock  # noqa: E402
from shim.config import Config, RuntimeConfig  # noqa: E402
from shim.mounts import unmount_all  # noqa: E402
from shim.process import Container, Process  # noqa: E402
from shim.sandbox import VmSandbox  # noqa: E402
from shim.stdio import HostStdio  # noqa: E402
from shim.vm_shape import GUEST_FILES  # noqa: E402
from tests.support.images import APPLETS, _busybox  # noqa: E402

CONSOLE_POLL_S = 0.01
OUTPUT = b"kata-py-bench"
# (label, how the console line starts); "kernel" is the first line that is not QEMU's own stderr
CONSOLE_MARKERS = (("initrd /init runs", "KATA_PY_INITRD"), ("initrd modules loaded", "KATA_PY_MODULES_LOADED"),
                   ("switch_root to the agent", "KATA_PY_SWITCH_ROOT"),
                   ("agent: python starts", "KATA_PY_AGENT_START"),
                   ("agent: gRPC serving", "KATA_PY_AGENT_READY"))
# the rows of the timing table, in boot order
PHASES = ("QMP up (QEMU launched)", "kernel start (est. from uptime)", "first console line",
          *(label for label, _ in CONSOLE_MARKERS[:4]), "agent port open (VSERPORT_CHANGE)",
          CONSOLE_MARKERS[4][0], "agent ready (health check)", "sandbox ready (CreateSandbox)",
          "container created", "first container output", "container exited")


@dataclass
class Boot:
    times: dict[str, float] = field(default_factory=dict)  # phase -> seconds since start()
    rss_kib: int | None = None
    pss_kib: int | None = None
    console_lines: list[tuple[float, str]] = field(default_factory=list)


class ConsoleWatcher:
    """Time-stamps every complete line appended to the console log (relative to t0, trio clock)."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0 = path, t0
        self.lines: list[tuple[float, str]] = []

    async def run(self) -> None:
        offset, partial = 0, b""
        while True:
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                offset += len(data)
                now = trio.current_time() - self.t0
                *complete, partial = (partial + data).split(b"\n")
                self.lines += [(now, line.decode(errors="replace").strip("\r")) for line in complete]
            await trio.sleep(CONSOLE_POLL_S)


def console_times(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Phase times from the console: the first guest line, each marker, and the kernel's start
    estimated as (time the initrd marker was seen - guest uptime it printed)."""
    out: dict[str, float] = {}
    guest = [(t, line) for t, line in lines if line and not line.startswith("qemu-system")]
    if guest:
        out["first console line"] = guest[0][0]
    for label, prefix in CONSOLE_MARKERS:
        hit = next(((t, line) for t, line in guest if line.startswith(prefix)), None)
        if hit is None:
            continue
        out[label] = hit[0]
        if prefix == "KATA_PY_INITRD" and "uptime=" in hit[1]:
            out["kernel start (est. from uptime)"] = hit[0] - float(hit[1].split("uptime=")[1].split()[0])
    return out


def make_bundle(root: Path) -> Path:
    """A bundle directory whose rootfs/ holds busybox-static and its applets (no containerd)."""
    bundle = root / "bundle"
    rootfs = bundle / "rootfs"
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2(_busybox(), rootfs / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", rootfs / "bin" / applet)
    return bundle


def container_spec(args: list[str]) -> dict[str, Any]:
    """A `runc spec`-like runtime spec trimmed to what busybox needs (the agent fixes root and cgroups)."""
    caps = ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"],
                    "cwd": "/", "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }


async def run_container(sandbox: VmSandbox, bundle: Path, cid: str, mark: Any) -> None:
    """Create + start `echo` in the sandbox; mark() each step; wait for its exit and remove it."""
    init = Process(cid, "", HostStdio(terminal=False), terminal=False)
    container = Container(cid, str(bundle), container_spec(["echo", OUTPUT.decode()]), True, init)
    await sandbox.create_container(container)
    mark("container created")
    agent = sandbox.agent
    got_output = trio.Event()

    async def read_stdout() -> None:
        async with aclosing(agent.read_stdout(cid, "")) as chunks:
            async for chunk in chunks:
                if chunk and not got_output.is_set():
                    mark("first container output")
                    got_output.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stdout)
            await agent.start_container(cid)
            status = await agent.wait_process(cid, "")
            mark("container exited")
            with trio.move_on_after(5):
                await got_output.wait()
            nursery.cancel_scope.cancel()
        if status != 0 or not got_output.is_set():
            raise RuntimeError(f"container {cid}: exit status {status}, output seen: {got_output.is_set()}")
    finally:
        await sandbox.remove_container(container)


async def boot_once(index: int, work: Path, settle: float) -> Boot:
    config = Config(runtime=RuntimeConfig(state_dir=str(work / "state")))
    result = Boot()
    bundle = make_bundle(work / f"c{index}")
    async with trio.open_nursery() as nursery:
        sandbox = VmSandbox(f"bench-cold-{index}", config, nursery)
        t0 = trio.current_time()
        paused = 0.0  # the idle settle, taken out of everything after it

        def mark(phase: str) -> None:
            result.times[phase] = trio.current_time() - t0 - paused

        console = ConsoleWatcher(sandbox.state_dir / "console.log", t0)
        nursery.start_soon(console.run)
        try:
            await sandbox.start({"hostname": f"bench-{index}"})
            mark("sandbox ready (CreateSandbox)")
            result.times.update(sandbox_phase_times(sandbox.timings))
            before = trio.current_time()
            await trio.sleep(settle)
            smaps = f"/proc/{sandbox.pid()}/smaps_rollup"
            result.rss_kib, result.pss_kib = proc_kib(smaps, "Rss"), proc_kib(smaps, "Pss")
            paused = trio.current_time() - before
            await run_container(sandbox, bundle, f"bench-c{index}", mark)
        finally:
            with trio.CancelScope(shield=True):
                await sandbox.stop()
            nursery.cancel_scope.cancel()
    result.console_lines = console.lines
    result.times.update({k: v for k, v in console_times(console.lines).items()})
    return result


def sandbox_phase_times(phases: dict[str, float]) -> dict[str, float]:
    """VmSandbox's PhaseTimer deltas, made cumulative."""
    names = {"vm_launch": "QMP up (QEMU launched)", "agent_port": "agent port open (VSERPORT_CHANGE)",
             "agent_ready": "agent ready (health check)"}
    out, total = {}, 0.0
    for key, delta in phases.items():
        total += delta
        if key in names:
            out[names[key]] = total
    return out


def artefact_rows(guest: Path) -> list[list[object]]:
    rows: list[list[object]] = []
    for name in GUEST_FILES:
        size = (guest / name).stat().st_size
        rows.append([name, size, f"{size / 1e6:.2f} MB"])
    return rows


def report(boots: list[Boot], guest: Path) -> None:
    print(f"\ncold start, {len(boots)} boot(s), seconds since VmSandbox.start()  [guest {guest}]")
    print(table(STATS_HEADERS, [stats_row(p, [b.times.get(p) for b in boots]) for p in PHASES]))
    print("\nQEMU memory at idle (agent up, no container), MiB")
    print(table(STATS_HEADERS, [stats_row("RSS", [mib(b.rss_kib) for b in boots]),
                                stats_row("PSS", [mib(b.pss_kib) for b in boots])]))
    print("\nguest artefacts")
    print(table(("file", "bytes", "size"), artefact_rows(guest)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=3, help="boots (default 3)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before reading QEMU's memory")
    parser.add_argument("--keep-console", action="store_true", help="print each boot's time-stamped console")
    args = parser.parse_args()
    guest = Config().guest_dir().resolve()
    boots: list[Boot] = []
    with vm_lock():
        for i in range(args.n):
            work = Path(tempfile.mkdtemp(prefix="kpb-cold-", dir="/tmp"))
            try:
                boot = trio.run(boot_once, i, work, args.settle)
            finally:
                unmount_all(work)  # never rmtree through a bind mount left by a failed run
                shutil.rmtree(work, ignore_errors=True)
            boots.append(boot)
            print(f"boot {i + 1}/{args.n}: first output at {boot.times.get('first container output', 0):.2f} s",
                  file=sys.stderr, flush=True)
            if args.keep_console:
                for t, line in boot.console_lines:
                    print(f"  {t:7.3f}  {line}", file=sys.stderr)
    report(boots, guest)


if __name__ == "__main__":
    main()
