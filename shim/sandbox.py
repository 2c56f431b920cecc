"""The pod's sandbox: one QEMU VM, the agent inside it, the shared directory, the pod's resources.

`VmSandbox.start()` reads as a linear script — check the guest image → choose the accelerator → launch
QEMU → wait for the agent port → connect the agent → set clock, entropy, identity → create the
sandbox — each step timed and adding context to its error. The Task service calls
create_container / remove_container / resources_changed / stop; it never sees QEMU or protobufs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from agent_client.errors import (
    AgentAlreadyExists,
    AgentError,
    AgentFailedPrecondition,
    AgentInvalidArgument,
    AgentNotFound,
    AgentTimeout,
    AgentUnavailable,
    AgentUnimplemented,
)
from agent_client.grpc_client import GrpcAgent, connect_agent
from agent_client.protocol import Agent, Storage
from agent_client.transport import SerialTransport, VsockTransport, vsock_available
from vmm.accel import AccelChoice, detect_accel
from vmm.config import SHARED_MOUNT_TAG, SerialChannel, VmConfig
from vmm.errors import VmmError
from vmm.hypervisor import VmExit
from vmm.qemu import QemuHypervisor
from vmm.vsock import read_token, start_with_free_cid

from . import guest_log, mounts, oci, portforward, volumes
from .annotations import apply_annotations
from .config import Config
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ShimError,
    Unavailable,
    Unimplemented,
)
from .factory.builds import build_dir, reap_orphan_builds
from .factory.key import NoTemplate, guest_image_hash, qemu_version, template_key
from .factory.protocol import PoolError
from .factory.protocol import request as pool_request
from .factory.store import TemplateStore
from .factory.template import ensure_template, restore_clone
from .hooks import Hook, oci_state, parse_hooks, run_hooks
from .layout import sandbox_state_dir
from .network.spec import netns_path
from .process import Container
from .resources.cgroups import (
    CgroupManager,
    detect_version,
    plan_cgroups,
    remove_overhead_root,
    sandbox_cpu_limits,
)
from .resources.reconciler import Reconciler
from .resources.sizing import SandboxSizing, Target, calculate_sandbox
from .share import GUEST_SHARED, GuestShare
from .timing import PhaseTimer
from .vm_shape import agent_over_vsock, find_guest, vm_config

if TYPE_CHECKING:
    from .network.pod import PodNetwork

log = logging.getLogger(__name__)

REMOVE_TIMEOUT_S = 30
# hot-plug and guest onlining of a few vCPUs and GiB: well under 10 s even under TCG
RESIZE_TIMEOUT_S = 60

_AGENT_TO_SHIM: list[tuple[type[AgentError], type[ShimError]]] = [
    (AgentNotFound, NotFound), (AgentAlreadyExists, AlreadyExists), (AgentInvalidArgument, InvalidArgument),
    (AgentFailedPrecondition, FailedPrecondition), (AgentUnimplemented, Unimplemented),
    (AgentUnavailable, Unavailable), (AgentTimeout, DeadlineExceeded),
]


@asynccontextmanager
async def agent_errors() -> AsyncIterator[None]:
    """Map agent errors onto the shim's error set, once, here."""
    try:
        yield
    except AgentError as exc:
        shim_class = next((s for a, s in _AGENT_TO_SHIM if isinstance(exc, a)), Internal)
        raise shim_class(f"agent: {exc}") from exc


async def _all_of(*calls: Callable[[], Awaitable[object]]) -> None:
    """Run `calls` concurrently; once all ended, raise the first error (the others are logged)."""
    errors: list[BaseException] = []

    async def run(call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except (AgentError, ShimError) as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(run, call)
    for extra in errors[1:]:
        log.warning("also failed: %s", extra)
    if errors:
        raise errors[0]


class Sandbox(Protocol):
    """What the Task service needs from a pod sandbox."""

    @property
    def agent(self) -> Agent: ...

    def pid(self) -> int: ...

    async def create_container(self, container: Container) -> None: ...

    async def remove_container(self, container: Container, *, sandbox_ending: bool = False) -> None: ...

    async def resources_changed(self, containers: Iterable[Container], *, wait: bool = False) -> None: ...

    async def stop(self) -> None: ...


class VmSandbox:
    """The real sandbox. Its VM's watcher and the agent's threads live in the daemon's nursery."""

    def __init__(self, sandbox_id: str, config: Config, nursery: trio.Nursery) -> None:
        self.id = sandbox_id
        self.config = config
        self._nursery = nursery
        self.state_dir = sandbox_state_dir(config.runtime.state_dir, sandbox_id)
        self.share = GuestShare(self.state_dir)  # what of the host the guest sees (shim/share.py)
        self._vm: QemuHypervisor | None = None
        self._agent: GrpcAgent | None = None
        self._start_lock = trio.Lock()
        self._stopped = False
        self.vm_exit: VmExit | None = None
        self.vm_exited = trio.Event()  # set once the VM is gone, whyever
        self.timings: dict[str, float] = {}
        h = config.hypervisor
        self.sizing = SandboxSizing(default_vcpus=h.default_vcpus, max_vcpus=h.max_vcpus,
                                    default_memory_mib=h.default_memory_mib, max_memory_mib=h.max_memory_mib)
        self.reconciler: Reconciler | None = None
        self._reconciler_scope = trio.CancelScope()
        self._containers: list[Container] = []  # the service's view, for the reconciler's provider
        self._cgroups: CgroupManager | None = None
        self._network: PodNetwork | None = None
        self._follow_scope = trio.CancelScope()
        self._follow_done = trio.Event()
        self._follow_done.set()  # nothing to wait for until a follower starts
        self._port_forward: portforward.Running | None = None  # CRI PortForward into the guest
        self._guest_log_scope = trio.CancelScope()  # the guest's console lines into our log
        self._guest_log_done = trio.Event()
        self._guest_log_done.set()  # nothing to wait for until the follower starts
        self._poststop: tuple[list[Hook], str, dict[str, str]] = ([], "", {})
        self.boot = ""  # how the VM came up: pool | template | cold (set by start)
        # a template to build once this sandbox runs (there was none), and that build's lifetime
        self._template_wanted: tuple[TemplateStore, str, VmConfig, AccelChoice] | None = None
        self._background_scope = trio.CancelScope()
        self._background_done = trio.Event()
        self._background_done.set()

    # --- what the service uses ------------------------------------------------------------------
    @property
    def agent(self) -> Agent:
        if self._agent is None:
            raise FailedPrecondition(f"sandbox {self.id}: VM is not running")
        return self._agent

    def pid(self) -> int:
        pid = self._vm.pid() if self._vm else None
        return pid or os.getpid()

    @property
    def vm_config(self) -> VmConfig | None:
        """The running VM's configuration (its agent channel with the vsock CID that was free)."""
        return self._vm.config if self._vm is not None else None

    async def create_container(self, container: Container) -> None:
        async with self._start_lock:
            if self._stopped:
                raise FailedPrecondition(f"sandbox {self.id} is stopped")
            if self._agent is None:
                if not container.is_sandbox:
                    raise FailedPrecondition(f"sandbox {self.id} is not running: create its sandbox container first")
                await self.start(container.spec, container.bundle)
        timer = PhaseTimer(f"container={container.id}")
        # the VM grows before the container exists in the guest, as Kata's does: its first instruction
        # sees every vCPU and byte it asked for (and crun can pin it to a cpuset the VM now has)
        others = [c for c in self._containers if c.id != container.id]
        try:
            await self.resources_changed([*others, container], wait=True)
        except BaseException:
            await self.resources_changed(others)
            raise
        timer.mark("resized")
        rootfs = self._share_rootfs(container)
        timer.mark("rootfs")
        try:
            guest_spec, pod_volumes = self._share_mounts(container)
            timer.mark("mounts")
            async with agent_errors():
                container.init.guest_pid = await self.agent.create_container(
                    container.id, guest_spec, rootfs, storages=pod_volumes, terminal=container.init.terminal,
                    stdin=container.init.stdio.has_stdin)
        except BaseException:
            self._unshare_rootfs(container)
            await self.resources_changed(others)
            raise
        timer.mark("agent_create")
        timer.log()

    async def remove_container(self, container: Container, *, sandbox_ending: bool = False) -> None:
        """Remove the container in the guest and release its host mounts. `sandbox_ending`: it is the
        sandbox's own container and the last one, so the VM goes next (Shutdown follows) and its
        guest state with it: the guest's removal (runtime kill/delete, unmounts: ~0.5 s under TCG)
        is skipped, which takes that wait out of `ctr run --rm` and RemovePodSandbox."""
        if self._agent is not None and self.vm_exit is None and not sandbox_ending:
            try:
                async with agent_errors():
                    await self._agent.remove_container(container.id, REMOVE_TIMEOUT_S)
            except NotFound:
                pass  # never reached the guest, or already gone
            except ShimError as exc:
                log.warning("container %s: remove in guest failed: %s", container.id, exc)
        self._unshare_rootfs(container)

    async def resources_changed(self, containers: Iterable[Container], *, wait: bool = False) -> None:
        """Resize the VM toward what its containers ask for. `wait`: return once the vCPUs and memory
        are online in the guest (create and Update: kubelet starts the workload next), raising
        Unavailable when the VM cannot be resized; otherwise (exits) return at once."""
        self._containers = list(containers)
        if self.reconciler is None or self.vm_exit is not None:
            return
        self.reconciler.request()
        if self._cgroups is not None:
            self._nursery.start_soon(self._after_resize)
        if wait:
            try:
                await self.reconciler.wait_converged(RESIZE_TIMEOUT_S)
            except ShimError as exc:
                raise Unavailable(f"sandbox {self.id}: resizing the VM: {exc}") from exc

    def target(self) -> Target:
        """The VM size the running containers ask for (pure arithmetic in resources/sizing.py)."""
        return calculate_sandbox([(c.resources, c.running()) for c in self._containers], self.sizing)

    async def stop(self) -> None:
        """Stop the VM and remove everything on the host. Idempotent.

        No DestroySandbox first: whatever still runs in the guest ends with the VM, and nothing is
        pending there (9p is mounted without a cache, so every write already reached the host);
        asking the guest to remove its containers would only add crun runs (~0.5 s under TCG).
        """
        self._stopped = True
        self._reconciler_scope.cancel()
        await self._stop_following_network()
        if self._port_forward is not None:  # its rules come out of the netns before the agent goes
            await self._port_forward.stop()
            self._port_forward = None
        if self._agent is not None:
            agent, self._agent = self._agent, None
            await agent.aclose()
        if self._vm is not None:
            await self._vm.stop()
        # the VM is gone: the guest log's last pass reads what it wrote, before its file goes
        self._guest_log_scope.cancel()
        with trio.move_on_after(2):
            await self._guest_log_done.wait()
        await self._teardown_network()
        await self._teardown_host_cgroups()
        await self._run_poststop_hooks()
        self.share.close()
        left = mounts.remove_tree(self.state_dir)  # never into a mount: user data stays whole
        if left:
            log.error("sandbox %s: left in its state dir (still mounted): %s", self.id, ", ".join(left))

    # --- the start script -----------------------------------------------------------------------
    async def start(self, sandbox_spec: dict[str, Any], bundle: str = "") -> None:
        """Boot the VM and bring its agent up.

        Raises InvalidArgument for refused io.katacontainers.* annotations (before anything starts),
        FailedPrecondition/Unavailable with context.
        """
        timer = PhaseTimer(f"sandbox={self.id}")
        # the sandbox's own configuration: the runtime's, adjusted by its permitted annotations
        effective = apply_annotations(self.config, sandbox_spec.get("annotations") or {})
        self.config = effective.config
        h = self.config.hypervisor
        self.sizing = SandboxSizing(default_vcpus=h.default_vcpus, max_vcpus=h.max_vcpus,
                                    default_memory_mib=h.default_memory_mib, max_memory_mib=h.max_memory_mib)
        guest = find_guest(self.config)
        try:
            accel = detect_accel(self.config.hypervisor.accel)  # type: ignore[arg-type]
        except VmmError as exc:
            raise FailedPrecondition(f"accelerator: {exc}") from exc
        log.info("sandbox %s: accelerator %s (%s)", self.id, accel.name, accel.reason)
        # the state dir is made by the share (or is a pool VM's, renamed): only its parent here
        self.state_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            vsock = agent_over_vsock(self.config, vsock_available())
            cfg = vm_config(self.config, self.id, guest, vsock=vsock, state_dir=self.state_dir,
                            assets=effective.assets)
            boot = await self._launch_vm(cfg, accel, timer)
            await self._init_guest(sandbox_spec, timer)
            await self._run_hooks(sandbox_spec, bundle, ("createRuntime", "prestart"), "created")
            await self._setup_network(sandbox_spec, timer)
            await self._follow_network()
            if self._network is not None:
                assert self._agent is not None  # _launch_vm connected it
                self._port_forward = await portforward.start(self._network.netns, self._agent, self._nursery)
            await self._start_reconciler()
            await self._setup_host_cgroups(sandbox_spec)
        except (VmmError, AgentError, ShimError, OSError) as exc:
            tail = self._vm.console_tail(2000) if self._vm else ""
            await self.stop()
            self._stopped = False
            if isinstance(exc, ShimError):
                raise
            raise Unavailable(f"sandbox {self.id}: VM start failed: {exc}\nconsole:\n{tail}") from exc
        self.timings = dict(timer.phases)
        self.boot = boot
        assert self._vm is not None  # started above
        self._guest_log_scope, self._guest_log_done = trio.CancelScope(), trio.Event()
        self._nursery.start_soon(self._follow_guest_log, self._vm.config.console_path)
        timer.log(accel=accel.name, boot=boot)
        if self._template_wanted is not None:
            # after the pod's own start, so that its boot does not share the CPUs with the build's
            self._background_done = trio.Event()
            self._nursery.start_soon(self._build_template_in_background, *self._template_wanted)
            self._template_wanted = None

    async def wait_background(self, timeout: float) -> None:
        """Let a template build this shim started finish (up to `timeout` s, then cancel it): the
        daemon calls this after it stopped serving, so that a short-lived first pod still leaves a
        template for the next one."""
        with trio.move_on_after(timeout) as waited:
            await self._background_done.wait()
        if waited.cancelled_caught:
            log.warning("sandbox %s: template build still running after %.0f s: cancelled", self.id, timeout)
            self._background_scope.cancel()
            await self._background_done.wait()

    def cancel_background(self) -> None:
        self._background_scope.cancel()

    async def _build_template_in_background(self, store: TemplateStore, key: str, cfg: VmConfig,
                                            accel: AccelChoice) -> None:
        """Build the template for `key` unless another process is building it or already did. Its
        failure is logged, never the sandbox's: the next sandbox boots cold and tries again."""
        try:
            with self._background_scope:
                await trio.to_thread.run_sync(reap_orphan_builds, self.config.runtime.state_dir)
                timer, began = PhaseTimer(f"template={key}"), time.time()
                with build_dir(self.config.runtime.state_dir, key) as work_dir:
                    built = await ensure_template(store, key, cfg, accel, work_dir=work_dir,
                                                  timeout=self.config.agent.dial_timeout_s, wait=False)
                if built is not None and built.meta.get("created", 0) >= began:  # ours, not found
                    timer.mark("template_build")
                    timer.log(sandbox=self.id)
        except (VmmError, OSError, trio.TooSlowError) as exc:
            log.warning("sandbox %s: building template %s failed: %s", self.id, key, exc)
        finally:
            self._background_done.set()

    async def _launch_vm(self, cfg: VmConfig, accel: AccelChoice, timer: PhaseTimer) -> str:
        """Get a running VM with a connected agent into self._vm / self._agent; say how: "pool" (a
        ready VM from the `kata-py pool` service), "template" (restored from a cached template), or
        "cold" (templates off, none built yet — one is then built in the background once this
        sandbox runs — or unusable). Each fallback is logged with its reason."""
        if self.config.factory.template and self.config.factory.pool_socket:
            try:
                if await self._launch_from_pool(cfg, accel, timer):
                    return "pool"
            except (VmmError, AgentError, OSError, trio.TooSlowError) as exc:
                log.warning("sandbox %s: VM from the pool failed, trying the template: %s", self.id, exc)
                await self._discard_vm()
        self.share.create()  # no-op for a pool VM's directory that stayed ours after a failed adoption
        if self.config.factory.template:
            try:
                how = await self._launch_from_template(cfg, accel, timer)
                if how is not None:
                    return how
            except (VmmError, AgentError, OSError, trio.TooSlowError) as exc:
                log.warning("sandbox %s: template start failed, booting cold: %s", self.id, exc)
                await self._discard_vm()
        self._vm = await start_with_free_cid(
            lambda c: QemuHypervisor(c, accel=accel, on_exit=self._on_vm_exit, start_timeout=30),
            cfg, self._nursery, self.id)
        cfg = self._vm.config  # vsock: with the CID that was free
        timer.mark("vm_launch")
        self._agent = await self._connect_agent(self._vm, cfg, timer)
        return "cold"

    async def _launch_from_template(self, cfg: VmConfig, accel: AccelChoice, timer: PhaseTimer) -> str | None:
        """Restore a clone of the template for `cfg`.

        None: no template can be used (logged why); when there is none yet, one is built in the
        background after this sandbox started. Raises VmmError, AgentError, OSError,
        trio.TooSlowError; a template whose restore failed is removed so that it is rebuilt.
        """
        f = self.config.factory
        store = TemplateStore(f.template_path(), f.template_cache_max_mb * (1 << 20))
        try:
            key = template_key(cfg, accel, guest_image_hash(cfg), qemu_version())
        except NoTemplate as exc:
            log.info("sandbox %s: no template for this VM: %s", self.id, exc)
            return None
        template = await trio.to_thread.run_sync(store.lookup, key)
        if template is None:
            log.info("sandbox %s: no template %s yet: booting cold, building it afterwards", self.id, key)
            self._template_wanted = (store, key, cfg, accel)
            return None
        try:
            self._vm = await restore_clone(template, cfg, accel, self._nursery, on_exit=self._on_vm_exit)
            timer.mark("vm_restore")
            self._agent = await self._connect_agent(self._vm, cfg, timer)
        except BaseException:
            store.remove(key)  # never reuse a template that failed to come up
            raise
        log.info("sandbox %s: restored from template %s", self.id, key)
        return "template"

    async def _launch_from_pool(self, cfg: VmConfig, accel: AccelChoice, timer: PhaseTimer) -> bool:
        """Adopt a ready VM from the pool (it moves the VM's sockets and shared dir into our state
        dir). False if the pool has none for this VM shape (logged). Raises VmmError, AgentError."""
        try:
            key = template_key(cfg, accel, guest_image_hash(cfg), qemu_version())
            reply = await pool_request(self.config.factory.pool_socket,
                                       {"op": "take", "key": key, "state_dir": str(self.state_dir)}, timeout=5)
        except (NoTemplate, PoolError, OSError) as exc:
            log.info("sandbox %s: no VM from the pool: %s", self.id, exc)
            return False
        if not reply.get("ok") or not isinstance(reply.get("pid"), int):
            log.info("sandbox %s: no VM from the pool: %s", self.id, reply.get("reason", reply))
            return False
        timer.mark("pool_take")
        self._vm = QemuHypervisor(cfg, accel=accel, on_exit=self._on_vm_exit, start_timeout=30)
        await self._vm.adopt(self._nursery, reply["pid"])
        self._agent = await self._connect_agent(self._vm, cfg, timer)
        return True

    async def _discard_vm(self) -> None:
        """Drop a half-started VM and agent before falling back to another way of starting."""
        agent, self._agent = self._agent, None
        vm, self._vm = self._vm, None
        with trio.CancelScope(shield=True):
            if agent is not None:
                await agent.aclose()
            if vm is not None:
                vm.on_exit = None  # its end is not the sandbox's
                await vm.stop()

    async def _connect_agent(self, vm: QemuHypervisor, cfg: VmConfig, timer: PhaseTimer) -> GrpcAgent:
        deadline = trio.current_time() + self.config.agent.dial_timeout_s
        if isinstance(cfg.agent, SerialChannel):
            # dialing before the guest opened the port stalls the first call (guest-notes)
            await vm.wait_agent_port_open(self.config.agent.dial_timeout_s)
            transport: SerialTransport | VsockTransport = SerialTransport(str(cfg.agent_socket))
        else:
            assert cfg.agent_token_file is not None
            transport = VsockTransport(cfg.agent.guest_cid, cfg.agent.port,
                                       token=read_token(cfg.agent_token_file))
        timer.mark("agent_port")
        agent = await connect_agent(transport, deadline)
        timer.mark("agent_ready")
        return agent

    async def _init_guest(self, sandbox_spec: dict[str, Any], timer: PhaseTimer) -> None:
        """Make the guest this pod's own: clock, entropy, identity, shared directory."""
        assert self._agent is not None
        hostname = sandbox_spec.get("hostname") or self.id[:12]
        agent = self._agent
        seed = os.urandom(256)
        storages = [Storage(driver="9p", source=SHARED_MOUNT_TAG, mount_point=GUEST_SHARED)]
        async with agent_errors():
            # a booted or restored guest has a stale clock and (for clones) the template's RNG state.
            # The three are independent and nothing runs in the guest before all are done: sent at
            # once, they cost one round trip to the guest instead of three (~0.06 s each under TCG)
            await _all_of(
                lambda: agent.set_guest_datetime(time.time()),
                lambda: agent.reseed_random(seed),
                lambda: agent.create_sandbox(hostname=hostname, dns=(), sandbox_id=self.id,
                                             machine_id=uuid.uuid4().hex, storages=storages))
        timer.mark("sandbox_create")

    async def _run_hooks(self, spec: dict[str, Any], bundle: str, phases: Iterable[str], status: str) -> None:
        """Run the sandbox spec's OCI hooks of `phases` on the host, in the pod's netns when it has one.

        Raises InvalidArgument for malformed hooks, FailedPrecondition when a hook fails.
        """
        hooks = [hook for phase in phases for hook in parse_hooks(spec, phase)]
        self._poststop = (parse_hooks(spec, "poststop"), bundle, spec.get("annotations") or {})
        if not hooks:
            return
        state = oci_state(self.id, bundle, self.pid(), status, spec.get("annotations") or {})
        path = netns_path(spec)
        what = "/".join(phases)
        if path is None:
            await trio.to_thread.run_sync(run_hooks, hooks, state, what)
        else:
            from .network.netns import run_in_netns

            await trio.to_thread.run_sync(run_in_netns, path, lambda: run_hooks(hooks, state, what))

    async def _run_poststop_hooks(self) -> None:
        hooks, bundle, annotations = self._poststop
        self._poststop = ([], "", {})
        if hooks:
            try:  # the runtime spec: poststop failures are logged, the deletion goes on
                await trio.to_thread.run_sync(run_hooks, hooks, oci_state(self.id, bundle, 0, "stopped",
                                                                          annotations), "poststop")
            except ShimError as exc:
                log.warning("sandbox %s: %s", self.id, exc)

    async def _setup_network(self, sandbox_spec: dict[str, Any], timer: PhaseTimer) -> None:
        """Mirror the pod's network namespace into the guest (no-op without one): tap + tc mirred per
        veth, a hot-plugged virtio-net NIC on each tap, addresses/routes/neighbours via the agent."""
        path = netns_path(sandbox_spec)
        if path is None:
            return
        if not await trio.Path(path).exists():
            raise InvalidArgument(f"sandbox {self.id}: network namespace {path} does not exist")
        assert self._vm is not None and self._agent is not None
        from .network.pod import PodNetwork  # netlink (pyroute2) costs 0.2 s of start-up: only with a netns

        self._network = PodNetwork(path)
        async with agent_errors():
            await self._network.setup(self._vm, self._agent)
        timer.mark("network")

    async def _follow_network(self) -> None:
        """Start the task that keeps the guest in step with the netns (no-op without one). It is the
        sandbox's: stop() and the VM's exit cancel it. Not being able to follow is logged, not fatal."""
        if self._network is None:
            return
        self._follow_scope = trio.CancelScope()
        self._follow_done = trio.Event()
        try:
            await self._nursery.start(self._run_follower, self._network)
        except OSError as exc:
            log.warning("sandbox %s: netns changes after start will not reach the guest: %s", self.id, exc)

    async def _run_follower(self, network: PodNetwork, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from .network.follow import follow

        assert self._vm is not None and self._agent is not None
        try:
            with self._follow_scope:
                await follow(network, self._vm, self._agent, task_status=task_status)
        finally:
            self._follow_done.set()

    async def _stop_following_network(self) -> None:
        # wait for it to finish, so no tap it is attaching can slip past the teardown
        self._follow_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._follow_done.wait()

    async def _teardown_network(self) -> None:
        """Undo _setup_network on the host (qdiscs, taps; the netns is not ours). Idempotent."""
        network, self._network = self._network, None
        if network is not None:
            await network.teardown()

    async def _setup_host_cgroups(self, sandbox_spec: dict[str, Any]) -> None:
        """Put QEMU (and its vCPU threads) into the pod's sandbox cgroup on the host.

        The sandbox cgroup sits next to the cgroupsPath containerd gave the sandbox container (Kata's
        `kata_<name>`), so kubelet's pod limits above it still hold. Without a cgroupsPath (a bare OCI
        spec) QEMU stays where the shim is.
        """
        cgroups_path = (sandbox_spec.get("linux") or {}).get("cgroupsPath") or ""
        qemu_pid = self._vm.pid() if self._vm is not None else None
        if not cgroups_path or qemu_pid is None:
            return
        try:
            plan = plan_cgroups(cgroups_path, self.id, version=detect_version(),
                                sandbox_cgroup_only=self.config.runtime.sandbox_cgroup_only)
        except ValueError as exc:
            raise InvalidArgument(f"linux.cgroupsPath: {exc}") from None
        manager = CgroupManager(plan)
        self._cgroups = manager
        for note in await trio.to_thread.run_sync(manager.create):
            log.info("sandbox %s cgroups: %s", self.id, note)
        await trio.to_thread.run_sync(manager.add_process, qemu_pid)
        await self._sync_host_cgroups()

    async def _sync_host_cgroups(self) -> None:
        """Apply the workload's CPU limits and move every (new) vCPU thread into the sandbox cgroup."""
        if self._cgroups is None or self._vm is None or self.vm_exit is not None:
            return
        # the pause container's own shares say nothing about what the pod may use
        workload = [(c.resources, c.running()) for c in self._containers
                    if oci.container_type(c.spec.get("annotations", {})) != "sandbox"]
        try:
            tids = await self._vm.vcpu_thread_ids()
            pid = self._vm.pid()
            if pid is None:
                return
            await trio.to_thread.run_sync(self._cgroups.constrain_vcpus, pid, tids)
            for note in await trio.to_thread.run_sync(self._cgroups.set_limits, sandbox_cpu_limits(workload)):
                log.info("sandbox %s cgroups: %s", self.id, note)
        except (VmmError, OSError) as exc:
            log.warning("sandbox %s: host cgroups not updated: %s", self.id, exc)

    async def _after_resize(self) -> None:
        # vCPU hot-plug creates QEMU threads that start outside the sandbox cgroup: move them
        if self.reconciler is not None:
            with trio.move_on_after(120):
                try:
                    await self.reconciler.wait_converged(120)
                except ShimError:
                    pass
        await self._sync_host_cgroups()

    async def _teardown_host_cgroups(self) -> None:
        """Remove the cgroups _setup_host_cgroups made. Idempotent."""
        manager, self._cgroups = self._cgroups, None
        if manager is not None:
            try:
                await trio.to_thread.run_sync(manager.delete)
                await trio.to_thread.run_sync(remove_overhead_root, manager)
            except OSError as exc:
                log.warning("sandbox %s: removing host cgroups: %s", self.id, exc)

    async def _start_reconciler(self) -> None:
        assert self._vm is not None and self._agent is not None
        h = self.config.hypervisor
        self.reconciler = Reconciler(self._vm, self._agent, vcpus=h.default_vcpus,
                                     memory_mib=h.default_memory_mib, provider=self.target)
        self._reconciler_scope = trio.CancelScope()
        await self._nursery.start(self._run_reconciler, self.reconciler)

    async def _follow_guest_log(self, console: Path) -> None:
        # owned by the sandbox: stop() cancels it
        try:
            with self._guest_log_scope:
                await guest_log.follow(console, log, f"guest {self.id}")
        finally:
            self._guest_log_done.set()

    async def _run_reconciler(self, reconciler: Reconciler, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # owned by the sandbox: stop() cancels it before the VM goes away
        with self._reconciler_scope:
            await reconciler.run(task_status=task_status)

    def _on_vm_exit(self, info: VmExit) -> None:
        self.vm_exit = info
        self.vm_exited.set()
        self._follow_scope.cancel()  # nothing left to follow into
        if not info.expected:
            tail = self._vm.console_tail(1500) if self._vm else ""
            log.error("sandbox %s: VM died (%s, rc=%s); console tail:\n%s", self.id, info.reason,
                      info.returncode, tail)
        if self._agent is not None:  # fail every call in flight now, rather than at their deadlines
            self._nursery.start_soon(self._agent.aclose)

    # --- rootfs sharing -------------------------------------------------------------------------
    def _share_rootfs(self, container: Container) -> Storage:
        """Mount containerd's rootfs on <bundle>/rootfs and attach it to the guest share; a read-only
        one (an image snapshot: ctr --read-only) is never writable by the guest (shim/share.py).

        Raises InvalidArgument for an unsupported mount and Internal when mounting fails.
        """
        bundle_rootfs = Path(container.bundle) / "rootfs"
        try:
            bundle_rootfs.mkdir(exist_ok=True)
            for m in container.rootfs_mounts:
                if m.type not in ("overlay", "bind", "ext4", "xfs", "tmpfs"):
                    raise InvalidArgument(f"rootfs mount type {m.type!r} is not supported")
                options = list(m.options)
                if m.type == "bind":  # mount(2) would ignore "ro" on a new bind
                    mounts.bind(m.source, bundle_rootfs, readonly="ro" in options, recursive="rbind" in options)
                else:
                    flags, data = mounts.mount_options(options)
                    mounts.mount(m.source, str(bundle_rootfs), m.type, flags, data)
            # root.readonly is the guest runtime's to apply (after it made its mount points, as runc
            # does); a read-only *mount* (an image snapshot) must stay so on the host
            readonly = bool(os.statvfs(bundle_rootfs).f_flag & os.ST_RDONLY)
            guest_path = self.share.share_rootfs(container.id, bundle_rootfs, readonly=readonly)
        except OSError as exc:
            self._unshare_rootfs(container)
            raise Internal(f"container {container.id}: rootfs: {exc}") from exc
        except ShimError:
            self._unshare_rootfs(container)
            raise
        return Storage(driver="", source="", mount_point=guest_path)

    def _share_mounts(self, container: Container) -> tuple[dict[str, Any], list[Storage]]:
        """The spec as the guest must see it, and the pod volumes the agent must provide for it.

        Every host bind mount is attached to the guest share (shim/share.py): only what the spec
        names becomes visible in the guest, one mount per source, read-only down to its submounts
        where the spec says ro. Kubernetes emptyDirs are not shared: the guest backs them itself
        (shim/volumes.py), one per pod. /dev/shm is backed by a tmpfs inside the guest instead of the
        host's (CRI hands each pod a host shm directory that the guest could not share memory
        through). Raises InvalidArgument for a missing source, Internal when a mount fails.
        """
        spec = copy.deepcopy(container.spec)
        pod_volumes: dict[str, Storage] = {}  # by guest path: a volume mounted twice is one storage
        for i, m in enumerate(spec.get("mounts") or []):
            options = list(m.get("options") or [])
            if m.get("type") not in ("bind", "rbind") and not {"bind", "rbind"} & set(options):
                continue  # proc, tmpfs, sysfs, devpts, mqueue...: made by the guest itself
            if m.get("destination") == "/dev/shm":
                # the same size as the host shm CRI made for the pod (its tmpfs size), in guest RAM
                shm_options = ["nosuid", "noexec", "nodev", "mode=1777"]
                with contextlib.suppress(OSError):
                    st = os.statvfs(m.get("source", ""))
                    shm_options.append(f"size={st.f_blocks * st.f_frsize}")
                m.update(type="tmpfs", source="shm", options=shm_options)
                continue
            source = m.get("source", "")
            if not isinstance(source, str) or not source.startswith("/") or not os.path.exists(source):
                raise InvalidArgument(f"mounts[{i}].source: {source!r} does not exist on the host")
            if volumes.is_empty_dir(source):
                try:
                    volume = volumes.storage_for(source, volumes.probe(source))
                except OSError as exc:
                    raise Internal(f"container {container.id}: mounts[{i}] {source}: {exc}") from exc
                pod_volumes[volume.mount_point] = volume
                m.update(source=volume.mount_point, type="bind")
                continue
            # kubelet's HostToContainer / Bidirectional: the host's later mounts below the volume
            # reach the container (the other way, a guest's mounts cannot cross the share)
            follow = bool({"rslave", "slave", "rshared", "shared"} & set(options))
            m["source"] = self.share.share_volume(container.id, i, source, readonly="ro" in options,
                                                  follow_host=follow)
            m["type"] = "bind"
        return spec, list(pod_volumes.values())

    def _unshare_rootfs(self, container: Container) -> None:
        """Take the container's mounts off the guest share, then its rootfs off the bundle."""
        self.share.unshare(container.id)
        if container.rootfs_mounts:
            mounts.unmount_all(Path(container.bundle) / "rootfs")
