"""`kata-py pool`: keep N VMs restored from the template and agent-ready, hand one to each shim that
asks, refill in the background; also keep spare shim daemons for `start` (spares.py).

A pool VM lives in `<runtime state_dir>/pool/vms/<id>/` (same filesystem as the sandboxes, so its
files can be renamed into a sandbox's state dir). The pool never dials a VM's agent (the serial
channel allows one connection per VM lifetime: that one is the shim's). Handing out (`take`): the
VM's QMP session is closed, its whole directory (sockets, console log, pid file and the guest share,
laid out as shim/share.py says before the VM starts) is renamed to be the shim's state dir (QEMU keeps
using it: it holds the listening sockets and the share's directory fd; a rename moves the mounts
below it along), and the pool stops watching it; the shim adopts the process by pid. From then on it is the
shim's: the pool only reaps it when it exits (it stays QEMU's parent). When the pool stops, every VM
it still owns is stopped; the socket is 0600 in a 0700 directory.

Each pool keeps its VMs in `vms/<pool pid>/<n>/`, next to `pool.proc`, its own process record (pid +
start time, vmm/procrecord.py); each VM's `qemu.proc` records its QEMU and goes with it to the shim
(whose `adopt` accepts only the process it names, and whose `delete` kills exactly that one after a
crash). A pool that stops removes its own directory only. A pool that was killed leaves its VMs
running (nothing tells a QEMU that its parent died): the next pool kills exactly the recorded QEMUs
of every pool whose record no longer names a running process, and removes those pools' directories.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import trio

from agent_client.transport import vsock_available
from kata_trio import open_nursery_unwrapped
from vmm.accel import AccelChoice, detect_accel
from vmm.config import VmConfig
from vmm.errors import VmmError
from vmm.procrecord import QEMU_RECORD, is_running, kill_recorded, read_record, write_record
from vmm.qemu import QemuHypervisor

from .. import mounts
from ..config import Config
from ..errors import ShimError
from ..layout import default_pool_socket, pool_vms_dir, sandboxes_dir, spares_dir
from ..share import GuestShare
from ..share import detach as share_detach
from ..vm_shape import agent_over_vsock, find_guest, vm_config
from .key import NoTemplate, guest_image_hash, qemu_version, template_key
from .protocol import PoolError, receive, send
from .spares import SpareShims
from .store import MIB, Template, TemplateStore
from .template import ensure_template, restore_clone

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
RETRY_AFTER_FAILURE = 5.0
POOL_RECORD = "pool.proc"
RECHECK_KEY_S = 30.0  # a rebuilt guest image (or config) changes the key: ready VMs are then useless


def default_socket(config: Config) -> Path:
    return default_pool_socket(config.runtime.state_dir)


class Pool:
    """Ready VMs of one shape (the runtime config's default sandbox) and the service that hands them out."""

    def __init__(self, config: Config, socket_path: Path, size: int, shims: int | None = None) -> None:
        self.config = config
        self.socket_path = socket_path
        self.size = size
        self.spares = SpareShims(spares_dir(socket_path),
                                 config.factory.pool_shims if shims is None else shims)
        self.root = pool_vms_dir(config.runtime.state_dir)
        self.own = self.root / str(os.getpid())  # this pool's VMs and its process record
        self.sandboxes = sandboxes_dir(config.runtime.state_dir)
        f = config.factory
        self.store = TemplateStore(f.template_path(), f.template_cache_max_mb * MIB)
        self.ready: list[QemuHypervisor] = []
        self._wanted = trio.Event()  # set when a VM was taken: refill
        self._counter = 0
        self.accel: AccelChoice | None = None
        self.key = ""
        self._nursery: trio.Nursery | None = None  # serve()'s; it also reaps the QEMUs handed out

    def vm_config(self, n: int | str) -> VmConfig:
        """This pool's VM number `n` (named, and its vsock CID derived, from an id unique on the
        host): the same VM shape a shim builds (shim/vm_shape.py), in the pool's own directory."""
        return vm_config(self.config, f"p{os.getpid()}-{n}", find_guest(self.config), vsock=agent_over_vsock(self.config, vsock_available()),
                         state_dir=self.own / str(n))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fill the pool and serve requests until cancelled; then stop every VM still owned.

        Raises NoTemplate (this VM shape cannot be templated), ShimError (no guest image), VmmError /
        OSError from the first template build.
        """
        self.accel = detect_accel(self.config.hypervisor.accel)  # type: ignore[arg-type]
        if self.size:  # a pool of spare shims only needs no guest
            self.key = self._current_key()
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_path.parent.chmod(0o700)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        await trio.to_thread.run_sync(reap_dead_pools, self.root)
        self.own.mkdir(mode=0o700)
        write_record(self.own / POOL_RECORD, os.getpid())  # before any VM: a successor then reaps them
        listener = _listen(self.socket_path)
        try:
            async with open_nursery_unwrapped() as nursery:  # what serve() raises comes out bare
                self._nursery = nursery
                await nursery.start(self.spares.run)
                await nursery.start(self._fill, nursery)
                nursery.start_soon(trio.serve_listeners, self._handle, [listener])
                log.info("pool: %d VM(s) of template %s and %d spare shim(s) ready at %s", len(self.ready),
                         self.key, len(self.spares.ready), self.socket_path)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                for vm in self.ready:
                    await vm.stop()
                self.ready.clear()
                self.socket_path.unlink(missing_ok=True)
                # every VM it owned is gone now (those being made went with the nursery); another
                # pool's directory (one serving another socket) stays
                _remove_dir(self.own)
                with contextlib.suppress(OSError):
                    self.root.rmdir()

    def _current_key(self) -> str:
        """Raises NoTemplate, InvalidVmConfig, FailedPrecondition (no guest image), OSError."""
        assert self.accel is not None
        probe = self.vm_config("probe")
        return template_key(probe, self.accel, guest_image_hash(probe), qemu_version())

    async def _recycle_if_stale(self) -> None:
        """Stop the ready VMs if the template key changed since they were made."""
        try:
            key = self._current_key()
        except (NoTemplate, ShimError, VmmError, OSError) as exc:
            log.warning("pool: cannot recompute the template key: %s", exc)
            return
        if key != self.key:
            log.info("pool: template key changed (%s -> %s): replacing %d ready VM(s)", self.key, key,
                     len(self.ready))
            stale, self.ready, self.key = self.ready, [], key
            for vm in stale:
                await vm.stop()
                _remove_dir(vm.config.state_dir)

    async def _template(self, work_dir: Path, cfg: VmConfig) -> Template:
        assert self.accel is not None
        template = await ensure_template(self.store, self.key, cfg, self.accel, work_dir=work_dir,
                                         timeout=self.config.agent.dial_timeout_s, wait=True)
        assert template is not None  # wait=True
        return template

    async def _fill(self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep `size` VMs ready; the first fill completes before the pool reports itself started."""
        if not self.size:
            task_status.started()
            return
        started = False
        while True:
            while len(self.ready) < self.size:
                self._counter += 1
                vm_id = self._counter
                cfg = self.vm_config(vm_id)
                try:
                    template = await self._template(self.own / f"build-{vm_id}", cfg)
                    GuestShare(cfg.state_dir).create()
                    vm = await restore_clone(template, cfg, self.accel, nursery)  # type: ignore[arg-type]
                    await vm.wait_agent_port_open(self.config.agent.dial_timeout_s)
                except (VmmError, OSError, trio.TooSlowError) as exc:
                    log.error("pool: cannot prepare a VM: %s", exc)
                    _remove_dir(cfg.state_dir)
                    await trio.sleep(RETRY_AFTER_FAILURE)
                    continue
                self.ready.append(vm)
                log.info("pool: VM %s ready (%d/%d)", vm_id, len(self.ready), self.size)
            if not started:
                started = True
                task_status.started()
            self._wanted = trio.Event()
            with trio.move_on_after(RECHECK_KEY_S):
                await self._wanted.wait()
            await self._recycle_if_stale()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    request = await receive(stream)
                    reply = await self._dispatch(request)
                    await send(stream, reply)
            except (PoolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                log.warning("pool: request failed: %s", exc)

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return {"ok": True, "size": self.size, "ready": {self.key: len(self.ready)},
                    "shims": len(self.spares.ready)}
        if op == "spare":
            spare = self.spares.take()
            return {"ok": True, "socket": spare} if spare else {"ok": False, "reason": "no spare shim ready"}
        if op != "take":
            return {"ok": False, "reason": f"unknown op {op!r}"}
        if request.get("key") != self.key:
            return {"ok": False, "reason": f"pool serves template {self.key}"}
        state_dir = Path(str(request.get("state_dir", "")))
        if state_dir.parent != self.sandboxes or await trio.to_thread.run_sync(os.path.lexists, state_dir):
            return {"ok": False, "reason": f"state_dir must be a {self.sandboxes}/<id> that does not exist yet"}
        if not self.ready:
            return {"ok": False, "reason": "empty"}
        vm = self.ready.pop(0)
        self._wanted.set()
        try:
            pid = vm.pid()
            proc = await vm.detach()
            os.rename(vm.config.state_dir, state_dir)  # the VM's directory becomes the sandbox's
        except (VmmError, OSError) as exc:
            log.error("pool: hand-out failed: %s", exc)
            if proc_alive(vm):
                os.kill(vm.pid() or 0, signal.SIGKILL)
            _remove_dir(vm.config.state_dir)  # what was not handed out
            return {"ok": False, "reason": f"hand-out failed: {exc}"}
        assert self._nursery is not None  # requests are served inside serve()
        self._nursery.start_soon(_reap, proc)  # its parent is still us
        log.info("pool: handed QEMU pid %s to %s", pid, state_dir)
        return {"ok": True, "pid": pid}


def proc_alive(vm: QemuHypervisor) -> bool:
    return vm.pid() is not None


async def _reap(proc: Any) -> None:
    try:
        await proc.wait()
    except Exception:  # noqa: BLE001 (reaping is best effort; never take the pool down)
        pass


def reap_dead_pools(root: Path) -> list[int]:
    """Kill the VMs of pools that died (SIGKILLed: their QEMUs outlive them) and remove their
    directories; return the QEMU pids killed. Only directories a pool recorded itself in
    (`<pid>/pool.proc`) whose pool no longer runs (pid + start time) are touched, in them only the
    processes their `qemu.proc` records still name are killed, and a directory whose VM could not be
    proven gone stays. Blocking (up to 2 s per VM). Never raises."""
    killed: list[int] = []
    try:
        owners = [d for d in root.iterdir() if d.name.isdigit() and not d.is_symlink() and d.is_dir()]
    except OSError as exc:
        log.warning("pool: cannot look for VMs of dead pools in %s: %s", root, exc)
        return killed
    for owner in owners:
        try:
            record = read_record(owner / POOL_RECORD)
            if record is None:  # killed before it recorded itself: it started no VM there
                with contextlib.suppress(OSError):
                    owner.rmdir()
                continue
            if is_running(record):
                continue  # a live pool's (one serving another socket)
            proven = True
            for vm_dir in owner.iterdir():
                if vm_dir.is_symlink() or not vm_dir.is_dir():
                    continue
                try:
                    pid = kill_recorded(vm_dir / QEMU_RECORD)
                except (OSError, ValueError) as exc:
                    log.error("pool: VM %s of dead pool %d: %s", vm_dir, record.pid, exc)
                    proven = False
                    continue
                if pid is not None:
                    killed.append(pid)
                    log.info("pool: killed QEMU pid %d of dead pool %d", pid, record.pid)
        except (OSError, ValueError) as exc:
            log.error("pool: directory %s of a dead pool: %s", owner, exc)
            continue
        if proven:
            _remove_dir(owner)
    return killed


def _remove_dir(path: Path) -> None:
    """Remove a pool VM's directory, or a pool's with its VMs' in it: each VM's share comes off (the
    one mount a pool VM has, shim/share.py), then the files, never into a mount that stayed."""
    for vm_dir in (path, *(d for d in path.glob("*") if d.is_dir() and not d.is_symlink())):
        share_detach(vm_dir)
    left = mounts.remove_tree(path)
    if left:
        log.error("pool: left in %s (still mounted): %s", path, ", ".join(left))


def _listen(path: Path) -> trio.SocketListener:
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # never world-connectable, not even for an instant
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def run_pool(config: Config, socket_path: str | None = None, size: int | None = None,
             shims: int | None = None) -> int:
    """Run the pool until SIGTERM/SIGINT. Returns an exit status."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    path = Path(socket_path or config.factory.pool_socket or default_socket(config))
    pool = Pool(config, path, config.factory.pool_size if size is None else size, shims)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with open_nursery_unwrapped() as nursery:  # serve()'s errors reach the except below bare
                nursery.start_soon(pool.serve)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except (NoTemplate, ShimError, VmmError, OSError) as exc:
        log.error("pool: %s", exc)
        return 1
    return 0
