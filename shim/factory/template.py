"""Build a template from a fresh boot, and restore clones from it (recipe: ../shared/guest-notes.md).

The template VM's RAM is the template's `ram` file (memory-backend-file, share=on). It boots until
the guest agent opens its virtio-serial port (QMP VSERPORT_CHANGE) and is then saved with
`x-ignore-shared`, so the state file holds device state only. The host never dials the template's
agent: the serial transport allows one connection per VM lifetime, and nothing of the host's
(entropy, clock, identity, secrets) must end up in the snapshot. A clone maps the same file
copy-on-write (share=off), starts with `-incoming defer`, loads the state, and gets a new vmgenid:
the 6.1 guest kernel treats its change as a VM fork and reseeds its RNG; the shim then sets clock,
entropy and identity through the agent as after any boot.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import trio

from kata_trio import open_nursery_unwrapped
from vmm.accel import AccelChoice
from vmm.config import NinePShare, RamFile, SerialChannel, VmConfig
from vmm.errors import VmNotRunning
from vmm.hypervisor import ExitCallback
from vmm.qemu import QemuHypervisor

from .key import guest_image_hash
from .store import RAM_FILE, STATE_FILE, Template, TemplateStore

log = logging.getLogger(__name__)

QEMU_START_TIMEOUT = 30.0
# The agent opens its port before it has imported grpc (seconds under TCG); saved then, every clone
# would redo that wait. Its console line after the gRPC server listens is the signal to save.
AGENT_READY_MARKER = b"KATA_PY_AGENT_READY"
SETTLE_S = 0.3  # let the agent's threads go idle (blocked in poll) before the snapshot


def template_vm_config(cfg: VmConfig, work_dir: Path, ram: Path) -> VmConfig:
    """The template VM: `cfg`'s device set, its own sockets in `work_dir`, RAM in the file `ram`."""
    shared = NinePShare(work_dir / "shared") if cfg.shared is not None else None
    return dataclasses.replace(cfg, state_dir=work_dir, console_log=None, agent=SerialChannel(), shared=shared,
                               ram_file=RamFile(ram, share=True), incoming_defer=False, start_paused=False)


def clone_vm_config(cfg: VmConfig, template: Template) -> VmConfig:
    """A clone: `cfg`'s own backends, the template's RAM copy-on-write, a new vmgenid."""
    return dataclasses.replace(cfg, ram_file=RamFile(template.ram, share=False), incoming_defer=True,
                               start_paused=False, vmgenid=uuid.uuid4())


async def build_template(store: TemplateStore, key: str, cfg: VmConfig, accel: AccelChoice, *,
                         work_dir: Path, timeout: float, extra: dict[str, Any] | None = None) -> Template:
    """Boot a template VM for `cfg`, save it, commit it under `key`; the VM is gone on return.

    The caller holds store.try_lock(key). Raises VmmError (boot, agent port, migration), OSError
    (disk), trio.TooSlowError after `timeout` s; nothing is committed then.
    """
    staging = store.staging_dir(key)
    (work_dir / "shared").mkdir(mode=0o700, parents=True, exist_ok=True)
    vm = QemuHypervisor(template_vm_config(cfg, work_dir, staging / RAM_FILE), accel=accel,
                        start_timeout=QEMU_START_TIMEOUT)
    try:
        async with open_nursery_unwrapped() as nursery:  # holds the template VM's watcher; errors bare
            try:
                with trio.fail_after(timeout):
                    await vm.start(nursery)
                    await vm.wait_agent_port_open(timeout)
                    await wait_console_marker(vm, AGENT_READY_MARKER)
                    await trio.sleep(SETTLE_S)
                    await vm.save_snapshot(staging / STATE_FILE, ignore_shared=True)
            finally:
                with trio.CancelScope(shield=True):
                    await vm.stop()
        template = await trio.to_thread.run_sync(store.commit, key, staging, extra or {})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    log.info("template %s built (state %d bytes)", key, template.meta["state_size"])
    return template


def _meta(cfg: VmConfig, accel: AccelChoice) -> dict[str, Any]:
    """What `kata-py template list` shows about a template, stored in its metadata."""
    return {"guest": guest_image_hash(cfg), "accel": accel.name, "memory_mib": cfg.memory_mib,
            "max_vcpus": cfg.max_vcpus}


async def ensure_template(store: TemplateStore, key: str, cfg: VmConfig, accel: AccelChoice, *,
                          work_dir: Path, timeout: float, wait: bool) -> Template | None:
    """The template for `key`, built first if there is none (store.lookup rejects stale, truncated
    or mismatched ones). While another process builds it: wait for that build (`wait`) or return
    None. Raises what build_template raises."""
    while True:
        template = await trio.to_thread.run_sync(store.lookup, key)
        if template is not None:
            return template
        with store.try_lock(key) as mine:
            if mine:
                template = await trio.to_thread.run_sync(store.lookup, key)  # built while we looked?
                if template is None:
                    store.remove_stale_builds()
                    template = await build_template(store, key, cfg, accel, work_dir=work_dir, timeout=timeout,
                                                    extra=_meta(cfg, accel))
                return template
        if not wait:
            return None
        await trio.sleep(1)  # someone else builds it


async def wait_console_marker(vm: QemuHypervisor, marker: bytes, poll: float = 0.02) -> None:
    """Return once `marker` is in the VM's console log (never dials the guest). Raises
    VmNotRunning if the VM exits first; the caller bounds the wait."""
    path = vm.config.console_path
    start = 0  # re-read the last len(marker)-1 bytes: the marker may straddle two reads
    while True:
        if vm.exited.is_set():
            raise VmNotRunning(f"template VM exited before {marker.decode()}\n{vm.console_tail()}")
        chunk = _read_from(path, start)
        if marker in chunk:
            return
        start = max(start, start + len(chunk) - len(marker) + 1)
        await trio.sleep(poll)


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:  # a console log: small, local, never blocks for long
        f.seek(offset)
        return f.read()


async def restore_clone(template: Template, cfg: VmConfig, accel: AccelChoice, nursery: trio.Nursery, *,
                        on_exit: ExitCallback | None = None, timeout: float = 30.0) -> QemuHypervisor:
    """Start a clone of `template` with `cfg`'s backends, running; its watcher lives in `nursery`.

    Raises VmStartError, MigrationError (the VM is stopped then), trio.TooSlowError.
    """
    vm = QemuHypervisor(clone_vm_config(cfg, template), accel=accel, on_exit=on_exit,
                        start_timeout=QEMU_START_TIMEOUT)
    try:
        with trio.fail_after(timeout):
            await vm.start(nursery)
            await vm.restore_snapshot(template.state, ignore_shared=True, resume=True, timeout=timeout)
    except BaseException:
        with trio.CancelScope(shield=True):
            await vm.stop()
        raise
    return vm
