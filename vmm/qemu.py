"""QemuHypervisor: one QEMU process, its QMP session, and the task that watches both.

Lifetime: `start(nursery)` runs `_run` in the caller's nursery. `_run` owns the process and an inner
nursery holding the QMP session; it returns (after recording `exit_info`, setting `exited` and calling
`on_exit`) when QEMU is gone, whoever ended it. If the owner's nursery is cancelled, `_run` kills QEMU
on the way out, so a QEMU never outlives its owner.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from kata_trio import open_nursery_unwrapped
from vmm.accel import AccelChoice, detect_accel
from vmm.cmdline import AGENT_CHARDEV_ID, AGENT_PORT_ID, VIRTIO_MEM_ID, build_argv, root_port_ids
from vmm.config import MEMORY_BLOCK_MIB, SerialChannel, VmConfig
from vmm.confine import default_confinement
from vmm.console import CONSOLE_CHECK_S, ConsoleBound
from vmm.errors import (
    HotplugError,
    MigrationError,
    QmpDisconnected,
    QmpError,
    QmpTimeout,
    VmmError,
    VmNotRunning,
    VmStartError,
)
from vmm.hypervisor import ExitCallback, VmExit
from vmm.procrecord import QEMU_RECORD, check_recorded, write_record
from vmm.qmp import QmpClient, open_qmp, try_connect_unix

log = logging.getLogger(__name__)

MIB = 1 << 20
CONSOLE_TAIL_BYTES = 4096
QMP_EOF_GRACE = 1.0  # QMP EOF normally means QEMU is exiting: give it this long before killing it
MIGRATION_POLL = 0.02
MIGRATION_FD_NAME = "migration"  # the getfd name of the snapshot file during save/restore


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"


class QemuHypervisor:
    """The real Hypervisor (see vmm.hypervisor.Hypervisor for the contract of each method)."""

    def __init__(
        self,
        config: VmConfig,
        *,
        accel: AccelChoice | None = None,
        qemu_binary: str = "qemu-system-x86_64",
        on_exit: ExitCallback | None = None,
        start_timeout: float = 10.0,
        unplug_timeout: float = 15.0,
        virtio_mem_settle: float = 2.0,
        powerdown_timeout: float = 0.0,
    ) -> None:
        """``accel`` defaults to detect_accel("auto") (never raises). ``powerdown_timeout`` > 0
        makes stop() try ACPI powerdown first; the guest must handle it, and our agent holds no
        state worth a clean shutdown, so the default skips it."""
        self.config = config
        self.accel_choice = accel or detect_accel("auto")
        self.on_exit = on_exit
        self.exited = trio.Event()
        self.exit_info: VmExit | None = None
        self._qemu_binary = qemu_binary
        self._start_timeout = start_timeout
        self._unplug_timeout = unplug_timeout
        self._virtio_mem_settle = virtio_mem_settle
        self._powerdown_timeout = powerdown_timeout
        self._state = _State.NEW
        self._proc: trio.Process | None = None
        self._qmp: QmpClient | None = None
        self._stopping = False
        self._qmp_lost = False
        self._start_scope = trio.CancelScope()  # stop() during start cancels the start phase
        self._qmp_scope = trio.CancelScope()  # detach() ends our QMP session through it
        self._detached = False  # handed to another process (warm pool): never killed or stopped by us
        self._stop_lock = trio.Lock()  # one escalation at a time; later callers find it done
        self._resize_lock = trio.Lock()  # guards read-modify-write of the hotplug slots
        self._unplug_pending: set[str] = set()  # vCPUs whose device_del the guest has not completed
        self._tainted_slots: set[tuple[int, ...]] = set()  # slots of those: not reused
        self._nics: dict[str, str] = {}  # NIC device id -> root port it sits on

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Launch QEMU and connect QMP; the watcher lives in ``nursery``.

        Raises VmStartError (console tail attached) if QEMU fails to launch or QMP does not come up
        within start_timeout, or the state dir cannot be prepared; InvalidVmConfig for a bad config
        (the VM stays unstarted); VmmError if called twice.
        """
        if self._state is not _State.NEW:
            raise VmmError(f"start() called on a VM in state {self._state.value}")
        cfg = self.config
        argv = build_argv(cfg, self.accel_choice, self._qemu_binary)  # before any state change
        self._state = _State.STARTING
        try:
            cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for stale in (cfg.qmp_socket, cfg.agent_socket, cfg.pid_file):
                if stale is not None:
                    stale.unlink(missing_ok=True)  # left by a QEMU that was SIGKILLed
        except OSError as e:
            self._finish(VmExit(None, "start-failed"))
            raise VmStartError(f"cannot prepare state dir {cfg.state_dir}: {e}") from e
        await nursery.start(self._run, argv)

    async def adopt(self, nursery: trio.Nursery, pid: int) -> None:
        """Take over a running QEMU another process started (the warm pool), with its QMP socket
        free at config.qmp_socket; watched through a pidfd from then on, managed as if started here.

        Its process record (vmm/procrecord.py) came with it into config.state_dir: only the process
        it names is adopted. Raises VmStartError if the process is gone, is not the one recorded, or
        QMP does not answer; VmmError if not NEW.
        """
        if self._state is not _State.NEW:
            raise VmmError(f"adopt() called on a VM in state {self._state.value}")
        self._state = _State.STARTING
        try:
            proc = AdoptedProcess(pid, self.config.state_dir / QEMU_RECORD)
        except (OSError, ValueError) as e:
            self._finish(VmExit(None, "start-failed"))
            raise VmStartError(f"cannot adopt QEMU pid {pid}: {e}") from e
        await nursery.start(self._watch, proc)

    async def detach(self) -> Any:
        """Let go of a running VM without stopping it: close our QMP session, stop watching, never
        kill it (another process adopts it). Returns the process, whose `wait()` the caller should
        await to reap it if it is our child. Raises VmNotRunning."""
        self._require_qmp()
        self._detached = True
        self._qmp_scope.cancel()
        with trio.move_on_after(2):
            await self.exited.wait()
        return self._proc

    async def _run(self, argv: list[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log_fd = os.open(self.config.console_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # QEMU's own stderr goes to the console log too: one file tells the whole story.
            # Confined between fork and exec (capabilities, no_new_privs, seccomp: vmm/confine.py).
            proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                                    preexec_fn=default_confinement().preexec)
        except (OSError, subprocess.SubprocessError) as e:  # SubprocessError: the confinement failed
            self._finish(VmExit(None, "start-failed"))
            raise VmStartError(f"cannot run {argv[0]}: {e}", self.console_tail()) from e
        finally:
            os.close(log_fd)
        await self._watch(proc, task_status=task_status)

    async def _watch(self, proc: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._proc = proc
        reason = "start-failed"
        try:
            if not isinstance(proc, AdoptedProcess):  # an adopted one came with its record (checked)
                _record(self.config.state_dir, proc.pid)
            async with open_nursery_unwrapped() as inner:  # VmStartError comes out bare
                with self._start_scope:
                    qmp: QmpClient = await inner.start(self._hold_qmp, proc)
                    self._qmp = qmp
                if self._start_scope.cancelled_caught:
                    raise VmStartError("stop() was called while the VM was starting", self.console_tail())
                self._state = _State.RUNNING
                reason = "exited"
                task_status.started()
                inner.start_soon(self._kill_on_qmp_eof, proc, qmp)
                inner.start_soon(self._bound_console)
                with self._qmp_scope:
                    await proc.wait()
                inner.cancel_scope.cancel()
            if self._qmp_lost:
                reason = "qmp-eof"
            if self._detached:
                reason = "detached"
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None and not self._detached:
                    proc.kill()
                    await proc.wait()
                if self._stopping and reason != "start-failed":
                    reason = "stopped"
                self._finish(VmExit(proc.returncode, reason))

    async def _bound_console(self) -> None:
        # whoever watches the VM (pool, template build, shim) keeps its console log bounded
        bound = ConsoleBound(self.config.console_path)
        while bound.supported:
            await trio.sleep(CONSOLE_CHECK_S)
            await trio.to_thread.run_sync(bound.check)
        log.warning("%s: the console log's filesystem cannot punch holes: it is not bounded",
                    self.config.console_path)

    async def _hold_qmp(self, proc: trio.Process, *, task_status: trio.TaskStatus[QmpClient]) -> None:
        path = self.config.qmp_socket
        deadline = trio.current_time() + self._start_timeout
        with trio.move_on_at(deadline) as waiting:
            while (sock := try_connect_unix(path)) is None:
                if proc.returncode is not None:
                    raise VmStartError(f"QEMU exited with status {proc.returncode} during start",
                                       self.console_tail())
                await trio.sleep(0.01)
        if sock is None or waiting.cancelled_caught:
            raise VmStartError(f"QMP socket {path} not ready within {self._start_timeout} s", self.console_tail())
        try:
            async with open_qmp(sock, connect_timeout=max(0.5, deadline - trio.current_time())) as qmp:
                task_status.started(qmp)
                await trio.sleep_forever()  # the session lives until _run cancels this task
        except QmpDisconnected as e:  # only open_qmp's connect raises it
            # Usually QEMU listened, then died on a bad option/device: say that rather than "reset".
            with trio.move_on_after(1.0):
                await proc.wait()
            if proc.returncode is not None:
                raise VmStartError(f"QEMU exited with status {proc.returncode} during start",
                                   self.console_tail()) from e
            raise VmStartError(f"QMP connection failed: {e}", self.console_tail()) from e

    async def _kill_on_qmp_eof(self, proc: trio.Process, qmp: QmpClient) -> None:
        await qmp.disconnected.wait()
        if self._detached:
            return
        with trio.move_on_after(QMP_EOF_GRACE):
            await proc.wait()
            return
        # QEMU lives on without its monitor: nothing can manage it any more.
        log.warning("QMP connection to QEMU pid %d lost; killing it", proc.pid)
        self._qmp_lost = True
        proc.kill()

    def _finish(self, info: VmExit) -> None:
        self._state = _State.EXITED
        self._qmp = None
        if self.exit_info is None:
            self.exit_info = info
        for path in () if self._detached else (self.config.qmp_socket, self.config.agent_socket,
                                                self.config.pid_file, self.config.state_dir / QEMU_RECORD):
            if path is not None:
                path.unlink(missing_ok=True)  # QEMU leaves its sockets behind when killed
        if not self.exited.is_set():
            self.exited.set()
            if self.on_exit is not None:
                try:
                    self.on_exit(info)
                except Exception:  # the hook belongs to someone else: never let it kill the watcher
                    log.exception("on_exit hook failed")

    async def stop(self, timeout: float = 10) -> None:
        """Escalate until QEMU is gone: [ACPI powerdown] → QMP quit → SIGTERM → SIGKILL.

        Each step gets a share of ``timeout``. Idempotent and safe to call concurrently; a VM
        never started is simply marked exited; one still starting has its start() fail with
        VmStartError. Does not raise VmmError.
        """
        if self._state is _State.NEW:
            self._finish(VmExit(None, "stopped"))
            return
        if self._detached:
            return  # someone else's now
        if self._state is _State.STARTING:
            self._stopping = True
            self._start_scope.cancel()  # start() then fails with VmStartError; _run kills QEMU
        async with self._stop_lock:
            if self._proc is not None and self._proc.returncode is None:
                # Only a stop that finds QEMU alive makes the exit "expected": one that comes
                # after a crash must not relabel it.
                self._stopping = True
            steps: list[tuple[str, Callable[[], Awaitable[None]], float]] = []
            if self._powerdown_timeout > 0:
                steps.append(("powerdown", self._qmp_command("system_powerdown"), self._powerdown_timeout))
            steps += [
                ("quit", self._qmp_command("quit"), timeout * 0.5),
                ("SIGTERM", self._signal(signal.SIGTERM), timeout * 0.3),
                ("SIGKILL", self._signal(signal.SIGKILL), max(timeout * 0.2, 1.0)),
            ]
            for name, action, budget in steps:
                if self.exited.is_set():
                    return
                log.debug("stopping VM: %s", name)
                try:
                    with trio.move_on_after(budget):
                        await action()
                except VmmError:
                    pass  # e.g. QMP already gone: the next step will do
                with trio.move_on_after(budget):
                    await self.exited.wait()
            if not self.exited.is_set():
                log.error("QEMU pid %s survived SIGKILL for %.1f s", self.pid(), timeout)

    def _qmp_command(self, command: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            qmp = self._qmp
            if qmp is not None:
                await qmp.execute(command, timeout=2.0)
        return run

    def _signal(self, sig: signal.Signals) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            proc = self._proc
            if proc is not None and proc.returncode is None:
                proc.send_signal(sig)
        return run

    async def wait_exited(self) -> int:
        """Wait until QEMU is gone; returns its exit status (-N: killed by signal N; -1 if unknown)."""
        await self.exited.wait()
        assert self.exit_info is not None
        return self.exit_info.returncode if self.exit_info.returncode is not None else -1

    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def console_tail(self, max_bytes: int = CONSOLE_TAIL_BYTES) -> str:
        """The end of the console log (guest serial console + QEMU's stderr)."""
        try:
            with open(self.config.console_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def qmp(self) -> QmpClient:
        """The live QMP session, for callers needing commands this class does not wrap.

        Raises VmNotRunning."""
        return self._require_qmp()

    def _require_qmp(self) -> QmpClient:
        if self._qmp is None or self._state is not _State.RUNNING:
            raise VmNotRunning(f"VM is {self._state.value}")
        return self._qmp

    # ---- agent readiness -----------------------------------------------------------------------
    async def wait_agent_port_open(self, timeout: float) -> None:
        """Return once the guest has opened the virtio-serial agent port.

        Checks query-chardev first (after a snapshot restore no new event comes), then waits for
        VSERPORT_CHANGE. With vsock there is no such signal: returns at once (dial with back-off).
        Raises QmpTimeout, or VmNotRunning (console tail attached) if QEMU exits meanwhile.
        """
        if not isinstance(self.config.agent, SerialChannel):
            return
        qmp = self._require_qmp()
        try:
            with qmp.listen("VSERPORT_CHANGE", lambda e: e.data.get("id") == AGENT_PORT_ID) as events:
                chardevs = await qmp.execute("query-chardev")
                if any(c.get("label") == AGENT_CHARDEV_ID and c.get("frontend-open") for c in chardevs):
                    return
                with trio.fail_after(timeout):
                    async for event in events:
                        if event.data.get("open"):
                            return
        except trio.TooSlowError:
            raise QmpTimeout(f"guest did not open the agent port within {timeout} s") from None
        except QmpDisconnected as e:
            raise VmNotRunning(f"QEMU exited while waiting for the agent port\n{self.console_tail()}") from e

    # ---- vCPUs ---------------------------------------------------------------------------------
    async def vcpu_thread_ids(self) -> list[int]:
        """Host thread ids of present vCPUs, from query-cpus-fast. Raises VmNotRunning, QmpError."""
        cpus = await self._require_qmp().execute("query-cpus-fast")
        return [c["thread-id"] for c in cpus]

    async def resize_vcpus(self, target: int) -> int:
        """Hot-add into free slots or hot-remove vCPUs we added, toward ``target`` (clamped to
        [1, max_vcpus]); returns the count present afterwards.

        Adding is immediate. Removing is a request the guest must complete (DEVICE_DELETED); one
        not completed within unplug_timeout counts as still present. Raises HotplugError when QEMU
        refuses a request (e.g. before the guest has booted, unplug is unsupported), VmNotRunning.
        """
        qmp = self._require_qmp()
        target = max(1, min(target, self.config.max_vcpus))
        async with self._resize_lock:
            slots = await qmp.execute("query-hotpluggable-cpus")
            present = [s for s in slots if "qom-path" in s]
            # One vCPU per slot: -smp N,maxcpus=M without threads>1 (what cmdline.py builds).
            self._unplug_pending &= {s["qom-path"].rsplit("/", 1)[1] for s in present}
            if target > len(present) and self._unplug_pending:
                # QEMU 7.2 under TCG crashed ("double free or corruption") on a CPU device_add while
                # another CPU's eject was still in flight: grow only once the guest finished it
                raise HotplugError(f"vCPU unplug of {sorted(self._unplug_pending)} still in flight",
                                   current=len(present))
            if target > len(present):
                # a slot whose eject outlived unplug_timeout is never reused: re-adding a CPU there
                # after the late eject crashed QEMU 7.2 ("double free or corruption")
                free = sorted((s for s in slots if "qom-path" not in s and _slot_key(s) not in self._tainted_slots),
                              key=_slot_key)
                for slot in free[: target - len(present)]:
                    dev_id = _cpu_device_id(slot["props"])
                    # Pass every prop unchanged: QEMU may grow new ones (protocols.md §7).
                    args = {"driver": slot["type"], "id": dev_id, **slot["props"]}
                    await self._hotplug_step(qmp, "device_add", args, self._count_vcpus)
            elif target < len(present) and self.accel_choice.name == "tcg" and not self.config.tcg_multithread:
                # single-threaded TCG runs every vCPU on one thread: unplugging one joins that very
                # thread and QEMU 7.2 aborts ("qemu_thread_join: Resource deadlock avoided"). Keep the
                # vCPUs; the host cgroup quota still shrinks to what the containers ask for.
                log.info("vCPU unplug skipped under single-threaded TCG (%d present, %d wanted)",
                         len(present), target)
            elif target < len(present):
                # Only devices we added have an id (under /machine/peripheral); the boot CPUs stay.
                ours = sorted((s for s in present if s["qom-path"].startswith("/machine/peripheral/")),
                              key=_slot_key, reverse=True)
                present_ids = {s["qom-path"].rsplit("/", 1)[1] for s in present}
                self._unplug_pending &= present_ids  # the guest finished those meanwhile
                for slot in ours[: len(present) - target]:
                    dev_id = slot["qom-path"].rsplit("/", 1)[1]
                    if dev_id in self._unplug_pending:
                        # a second device_del of a CPU whose eject is still in flight crashed QEMU 7.2
                        # here ("double free or corruption"): wait for the guest instead
                        continue
                    if not await self._unplug(qmp, dev_id, self._count_vcpus):
                        self._unplug_pending.add(dev_id)
                        self._tainted_slots.add(_slot_key(slot))
                        break  # the guest is slow or unwilling: do not pile up requests
            return await self._count_vcpus()

    async def _count_vcpus(self) -> int:
        return len(await self._require_qmp().execute("query-cpus-fast"))

    # ---- memory --------------------------------------------------------------------------------
    async def resize_memory(self, target_mib: int) -> int:
        """Move guest memory toward ``target_mib`` (clamped to [base, max_memory_mib]).

        pc-dimm: grow by one DIMM (a multiple of 128 MiB, rounded up within max); shrink by
        unplugging whole DIMMs we added that fit, newest first (best effort, guest must agree).
        virtio-mem: qom-set requested-size and wait up to virtio_mem_settle for the guest to plug.
        Returns base + plugged MiB as QEMU reports it now. Raises HotplugError (no free slot,
        QEMU refused), VmNotRunning.
        """
        qmp = self._require_qmp()
        async with self._resize_lock:
            if self.config.memory_hotplug == "virtio-mem":
                return await self._resize_virtio_mem(qmp, target_mib)
            return await self._resize_dimms(qmp, target_mib)

    async def _memory_mib(self) -> int:
        summary = await self._require_qmp().execute("query-memory-size-summary")
        return (summary["base-memory"] + summary.get("plugged-memory", 0)) // MIB

    async def _resize_dimms(self, qmp: QmpClient, target_mib: int) -> int:
        cfg = self.config
        current = await self._memory_mib()
        target = max(cfg.memory_mib, min(target_mib, cfg.max_memory_mib))
        devices = await qmp.execute("query-memory-devices")
        dimms = [d["data"] for d in devices if d["type"] == "dimm"]
        if target > current:
            room = (cfg.max_memory_mib - current) // MEMORY_BLOCK_MIB * MEMORY_BLOCK_MIB
            add = min(-(-(target - current) // MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB, room)
            if add <= 0:
                return current
            if len(dimms) >= cfg.memory_slots:
                raise HotplugError(f"no free memory slot ({cfg.memory_slots} in use)", current=current)
            used = {d.get("id") for d in dimms}
            n = next(i for i in range(len(used) + 1) if f"dimm{i}" not in used)
            await self._hotplug_step(qmp, "object-add",
                                     {"qom-type": "memory-backend-ram", "id": f"mem{n}", "size": add * MIB},
                                     self._memory_mib)
            try:
                await self._hotplug_step(qmp, "device_add",
                                         {"driver": "pc-dimm", "id": f"dimm{n}", "memdev": f"mem{n}"},
                                         self._memory_mib)
            except HotplugError:
                with trio.CancelScope(shield=True):
                    await qmp.execute("object-del", {"id": f"mem{n}"})
                raise
        elif target < current:
            for dimm in sorted((d for d in dimms if d.get("hotplugged") and d.get("id")),
                               key=lambda d: d["addr"], reverse=True):
                size = dimm["size"] // MIB
                if current - size < target:
                    continue
                if not await self._unplug(qmp, dimm["id"], self._memory_mib):
                    break
                # The backend can go only once the DIMM is gone.
                await qmp.execute("object-del", {"id": dimm["memdev"].rsplit("/", 1)[1]})
                current -= size
        return await self._memory_mib()

    async def _resize_virtio_mem(self, qmp: QmpClient, target_mib: int) -> int:
        cfg = self.config
        devices = await qmp.execute("query-memory-devices")
        dev = next((d["data"] for d in devices if d["type"] == "virtio-mem" and d["data"].get("id") == VIRTIO_MEM_ID),
                   None)
        if dev is None:
            raise HotplugError("no virtio-mem device (max_memory_mib == memory_mib?)", current=cfg.memory_mib)
        block, max_size = dev["block-size"], dev["max-size"]
        want = max(0, min(target_mib - cfg.memory_mib, max_size // MIB)) * MIB
        want = min(-(-want // block) * block, max_size)  # whole blocks
        with qmp.listen("MEMORY_DEVICE_SIZE_CHANGE", lambda e: e.data.get("id") == VIRTIO_MEM_ID) as events:
            await self._hotplug_step(qmp, "qom-set", {"path": f"/machine/peripheral/{VIRTIO_MEM_ID}",
                                                      "property": "requested-size", "value": want},
                                     self._memory_mib)
            size = dev["size"]
            with trio.move_on_after(self._virtio_mem_settle):
                while size != want:
                    size = (await events.__anext__()).data["size"]
        return cfg.memory_mib + size // MIB

    # ---- hotplug helpers -----------------------------------------------------------------------
    async def _hotplug_step(self, qmp: QmpClient, command: str, args: dict[str, Any],
                            measure: Callable[[], Awaitable[int]]) -> None:
        try:
            await qmp.execute(command, args)
        except QmpError as e:
            raise HotplugError(f"{command} {args.get('id', '')}: {e.error_class}: {e.desc}",
                               current=await measure()) from e

    async def _unplug(self, qmp: QmpClient, dev_id: str, measure: Callable[[], Awaitable[int]]) -> bool:
        """device_del and wait for the guest to complete it. True if gone, False on timeout."""
        names = ("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR")
        with qmp.listen(names, lambda e: e.data.get("device") == dev_id) as events:
            await self._hotplug_step(qmp, "device_del", {"id": dev_id}, measure)
            with trio.move_on_after(self._unplug_timeout):
                event = await events.__anext__()
                if event.name == "DEVICE_DELETED":
                    return True
                raise HotplugError(f"guest refused to unplug {dev_id}", current=await measure())
        log.warning("unplug of %s not completed by the guest within %.1f s", dev_id, self._unplug_timeout)
        return False

    # ---- NICs --------------------------------------------------------------------------------
    async def add_tap_nic(self, nic_id: str, tap_fd: int, mac: str, *, mtu: int = 0) -> str:
        """Hot-plug a virtio-net-pci NIC on an already open tap (``tap_fd`` stays ours to close).

        The NIC goes onto the first free pre-created PCIe root port (q35) and is named ``nic_id``
        (its netdev ``<nic_id>-nd``). Returns the root port used. Raises HotplugError (no free
        port, or QEMU refused), VmNotRunning.
        """
        qmp = self._require_qmp()
        async with self._resize_lock:
            port = self._free_root_port()
            netdev, fdname = f"{nic_id}-nd", f"{nic_id}-fd"
            try:
                await qmp.pass_fd(tap_fd, fdname)
                await qmp.execute("netdev_add", {"type": "tap", "id": netdev, "fd": fdname, "vhost": False})
                dev: dict[str, Any] = {"driver": "virtio-net-pci", "id": nic_id, "netdev": netdev, "mac": mac,
                                       "bus": port}
                if mtu:
                    dev["host_mtu"] = mtu
                try:
                    await qmp.execute("device_add", dev)
                except QmpError:
                    await self._quiet(qmp, "netdev_del", {"id": netdev})
                    raise
            except QmpError as e:
                await self._quiet(qmp, "closefd", {"fdname": fdname})
                raise HotplugError(f"NIC {nic_id}: {e.error_class}: {e.desc}", current=len(self._nics)) from e
            self._nics[nic_id] = port
            return port

    def _free_root_port(self) -> str:
        used = set(self._nics.values())
        for port in root_port_ids(self.config):
            if port not in used:
                return port
        raise HotplugError(f"no free PCIe root port for a NIC ({len(used)} in use)", current=len(used))

    async def remove_nic(self, nic_id: str) -> None:
        """Unplug a NIC added by add_tap_nic (best effort: the guest must cooperate). Raises VmNotRunning."""
        qmp = self._require_qmp()
        if self._nics.pop(nic_id, None) is None:
            return
        try:
            await self._unplug(qmp, nic_id, self._nic_count)
        except HotplugError as e:
            log.warning("NIC %s: %s", nic_id, e)
        await self._quiet(qmp, "netdev_del", {"id": f"{nic_id}-nd"})

    async def _nic_count(self) -> int:
        return len(self._nics)

    async def _quiet(self, qmp: QmpClient, command: str, args: dict[str, Any]) -> None:
        try:
            await qmp.execute(command, args)
        except QmpError as e:
            log.debug("%s %s: %s", command, args, e)

    # ---- snapshots -----------------------------------------------------------------------------
    async def save_snapshot(self, state_path: Path, *, ignore_shared: bool = False, timeout: float = 60) -> None:
        """Pause the VM and migrate its state into ``state_path`` (QEMU 7.2 has no file: URI, and
        its -sandbox forbids exec:, so an fd we open is passed over QMP). ``ignore_shared`` (template
        VMs whose RAM is a shared file) leaves RAM out.

        The VM stays paused afterwards. Raises MigrationError (also when QEMU dies meanwhile),
        VmNotRunning.
        """
        qmp = self._require_qmp()
        with self._migration_errors("cannot save snapshot"):
            await self._set_ignore_shared(qmp, ignore_shared)
            await qmp.execute("stop")
            await self._migrate_through_file(qmp, "migrate", state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            await self._wait_migration(qmp, timeout)

    async def restore_snapshot(self, state_path: Path, *, ignore_shared: bool = False, resume: bool = True,
                               timeout: float = 60) -> None:
        """Load ``state_path`` into this VM, which must have been started with incoming_defer and
        the template's exact device set. ``resume`` sends cont. Raises MigrationError, VmNotRunning.
        """
        if not self.config.incoming_defer:
            raise MigrationError("restore_snapshot needs a VM started with incoming_defer=True")
        qmp = self._require_qmp()
        if not await trio.Path(state_path).is_file():
            raise MigrationError(f"snapshot {state_path} does not exist")
        with self._migration_errors("cannot restore snapshot"):
            await self._set_ignore_shared(qmp, ignore_shared)
            await self._migrate_through_file(qmp, "migrate-incoming", state_path, os.O_RDONLY)
            await self._wait_migration(qmp, timeout)
            if resume:
                # The source was paused before saving, so the clone arrives paused too.
                status = await qmp.execute("query-status")
                if not status.get("running"):
                    await qmp.execute("cont")

    async def _migrate_through_file(self, qmp: QmpClient, command: str, path: Path, flags: int) -> None:
        """Open ``path``, hand it to QEMU (getfd over SCM_RIGHTS; our copy is closed) and start
        ``command`` (migrate / migrate-incoming) on it. Raises MigrationError, QmpError."""
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)  # a local file: opening does not block
        except OSError as e:
            raise MigrationError(f"cannot open {path}: {e}") from e
        try:
            await qmp.pass_fd(fd, MIGRATION_FD_NAME)
        finally:
            os.close(fd)
        try:
            await qmp.execute(command, {"uri": f"fd:{MIGRATION_FD_NAME}"})  # QEMU takes the fd from here
        except QmpError:
            await self._quiet(qmp, "closefd", {"fdname": MIGRATION_FD_NAME})
            raise

    @contextmanager
    def _migration_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except QmpError as e:
            raise MigrationError(f"{what}: {e}") from e
        except QmpDisconnected as e:
            raise MigrationError(f"{what}: QEMU went away during migration\n{self.console_tail()}") from e

    async def _set_ignore_shared(self, qmp: QmpClient, on: bool) -> None:
        if on:
            await qmp.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})

    async def _wait_migration(self, qmp: QmpClient, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                while True:
                    info = await qmp.execute("query-migrate")
                    status = info.get("status")
                    if status == "completed":
                        return
                    if status in ("failed", "cancelled"):
                        raise MigrationError(f"migration {status}: {info.get('error-desc', 'no detail')}")
                    await trio.sleep(MIGRATION_POLL)
        except trio.TooSlowError:
            raise MigrationError(f"migration not completed within {timeout} s") from None


class AdoptedProcess:
    """A QEMU this process did not spawn, watched and signalled through a pidfd (the subset of
    trio.Process that _watch and stop() use). Its exit status goes to its parent: -1 here."""

    def __init__(self, pid: int, record: Path | None = None) -> None:
        """`record`: the process record that must name `pid` (checked after the pidfd is open, so that
        a pass proves the pidfd is the recorded process). Raises OSError, ValueError (bad record)."""
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)
        if record is not None:
            try:
                check_recorded(record, pid)
            except BaseException:
                os.close(self._fd)
                raise
        self._exited = trio.Event()
        self._polling = False  # trio lets one task wait on an fd: the others wait on _exited

    async def wait(self) -> int:
        if self.returncode is None and not self._polling:
            self._polling = True
            try:
                await trio.lowlevel.wait_readable(self._fd)
            finally:
                self._polling = False
            self.returncode = -1
            os.close(self._fd)
            self._exited.set()
        await self._exited.wait()
        return -1

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._fd, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _record(state_dir: Path, pid: int) -> None:
    """Record the QEMU we started (pid + start time) next to its sockets: after a crash of its owner,
    `delete` (or the pool's successor) kills exactly that process. Raises VmStartError."""
    try:
        write_record(state_dir / QEMU_RECORD, pid)
    except OSError as e:
        raise VmStartError(f"cannot record QEMU pid {pid} in {state_dir}: {e}") from e


def _slot_key(slot: dict[str, Any]) -> tuple[int, ...]:
    props = slot["props"]
    return tuple(props.get(k, 0) for k in ("node-id", "socket-id", "die-id", "core-id", "thread-id"))


def _cpu_device_id(props: dict[str, Any]) -> str:
    # Derived from the slot, so the id says where the CPU sits and never collides.
    return "cpu-" + "-".join(str(props[k]) for k in ("socket-id", "core-id", "thread-id") if k in props)
