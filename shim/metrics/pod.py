"""What one shim serves on its management socket: `/metrics` for its pod, `/agent-url`.

`PodMetrics` is created by the daemon next to the Task service. It times every ttrpc method
(`instrument` wraps the method table), turns the `timing` lines into histograms (a log handler),
reads the QEMU's and the shim's own /proc, the VM's size from the reconciler, and each container's
cgroup stats from the agent. Agent stats are cached: a scrape starts a refresh when the values are
older than STATS_TTL_S and waits for it at most STATS_WAIT_S, then serves what it has, so a slow or
stuck guest never holds a scrape longer than that (its calls time out after STATS_CALL_TIMEOUT_S in
the background).

Once the sandbox runs (the first successful RPC that finds `sandbox.boot` set: its state dir exists
then, whether made or renamed from a pool VM), `serve` writes `pod.json` (the CRI pod's name,
namespace and uid, from the sandbox container's annotations, for `kata-py monitor`) and listens on
`shim-monitor.sock`, 0600, both in the sandbox's 0700 state dir; stop() removes that dir with them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import trio

import ttrpc
from agent_client.protocol import ContainerStats
from vmm.config import VmConfig, VsockChannel

from . import http
from .exposition import CONTENT_TYPE, Counter, Family, Histogram, counter, gauge, render
from .procfs import ProcessStats, read_process
from .timing import TimingHandler, TimingMetrics

log = logging.getLogger(__name__)

SOCKET_NAME = "shim-monitor.sock"
POD_FILE = "pod.json"
STATS_TTL_S = 2.0
STATS_WAIT_S = 1.0
STATS_CALL_TIMEOUT_S = 5.0
# the CRI annotations containerd puts on the sandbox container (CRI-O's names too)
POD_ANNOTATIONS = {
    "cri_pod_name": ("io.kubernetes.cri.sandbox-name", "io.kubernetes.cri-o.KubeName"),
    "cri_pod_namespace": ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.cri-o.Namespace"),
    "cri_pod_uid": ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"),
}
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
AGENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class SandboxView(Protocol):
    """What the metrics read of a VmSandbox (attributes it has; a fake in tests)."""

    id: str
    state_dir: Path
    boot: str

    @property
    def agent(self) -> Any: ...

    def pid(self) -> int: ...

    @property
    def vm_config(self) -> VmConfig | None: ...


class ServiceView(Protocol):
    @property
    def containers(self) -> Mapping[str, Any]: ...  # id → shim.process.Container (read only here)


def pod_identity(sandbox_id: str, annotations: Mapping[str, Any]) -> dict[str, str]:
    """The labels `kata-py monitor` puts on a pod's series: its sandbox id and CRI metadata ("" when
    the pod did not come from CRI)."""
    out = {"sandbox_id": sandbox_id}
    for label, keys in POD_ANNOTATIONS.items():
        value = next((annotations[k] for k in keys if isinstance(annotations.get(k), str)), "")
        out[label] = value[:253]
    return out


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ttrpc.StatusError):
        return exc.code.name
    if isinstance(exc, trio.Cancelled):
        return "CANCELLED"
    return "UNKNOWN"


class PodMetrics:
    def __init__(self, sandbox: SandboxView, service: ServiceView) -> None:
        self.sandbox = sandbox
        self.service = service
        self.started = trio.Event()  # the sandbox runs: its state dir exists
        self.serving = trio.Event()  # the socket listens
        self.rpc = Histogram("kata_py_shim_rpc_duration_seconds",
                             "Time the shim took to answer each Task API method containerd called.",
                             ["method"], RPC_BUCKETS)
        self.rpc_errors = Counter("kata_py_shim_rpc_errors_total",
                                  "Task API calls that failed, by method and gRPC status code.",
                                  ["method", "code"])
        self.agent_stats = Histogram("kata_py_agent_stats_duration_seconds",
                                     "Time of the shim's StatsContainer call to the guest agent.",
                                     (), AGENT_BUCKETS)
        self.agent_stats_errors = Counter("kata_py_agent_stats_errors_total",
                                          "StatsContainer calls that failed or timed out.", ())
        self.timing = TimingMetrics()
        self._timing_handler: TimingHandler | None = None
        self._stats: dict[str, ContainerStats] = {}
        self._stats_at = -math.inf
        self._refreshing: trio.Event | None = None
        self._nursery: trio.Nursery | None = None

    # --- hooks the daemon wires -------------------------------------------------------------------
    def instrument(self, methods: dict[str, ttrpc.Method[Any]]) -> dict[str, ttrpc.Method[Any]]:
        """The ttrpc method table with every handler timed."""
        return {name: ttrpc.Method(m.request_type, self._timed(name, m.handler)) for name, m in methods.items()}

    def _timed(self, name: str, inner: Callable[[ttrpc.RequestContext, Any], Awaitable[Any]]
               ) -> Callable[[ttrpc.RequestContext, Any], Awaitable[Any]]:
        async def handler(ctx: ttrpc.RequestContext, request: Any) -> Any:
            t0 = time.monotonic()
            code = ""
            try:
                return await inner(ctx, request)
            except BaseException as exc:
                code = error_code(exc)
                raise
            finally:
                self.rpc.observe(time.monotonic() - t0, method=name)
                if code:
                    self.rpc_errors.inc(method=name, code=code)
                if not self.started.is_set() and self.sandbox.boot:
                    self.started.set()
        return handler

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Observe the timing lines from now on; once the sandbox runs, serve its socket. Until cancelled."""
        self._timing_handler = TimingHandler.install(self.timing)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self.started.wait()
                state_dir = Path(self.sandbox.state_dir)
                try:
                    await trio.to_thread.run_sync(self._write_pod_file, state_dir)
                    sock = ttrpc.bind_unix_socket(str(state_dir / SOCKET_NAME))
                except OSError as exc:
                    log.warning("sandbox %s: no metrics socket: %s", self.sandbox.id, exc)
                    await trio.sleep_forever()
                listener = ttrpc.listener_from_socket(sock)
                log.info("sandbox %s: metrics on %s", self.sandbox.id, state_dir / SOCKET_NAME)
                await nursery.start(http.serve, [listener], self.handle)
                self.serving.set()
        finally:
            self._nursery = None
            if self._timing_handler is not None:
                self._timing_handler.uninstall()

    def _write_pod_file(self, state_dir: Path) -> None:
        annotations: Mapping[str, Any] = {}
        for c in list(self.service.containers.values()):
            if getattr(c, "is_sandbox", False):
                annotations = (c.spec or {}).get("annotations") or {}
                break
        tmp = state_dir / f".{POD_FILE}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(pod_identity(self.sandbox.id, annotations), f)
        os.replace(tmp, state_dir / POD_FILE)

    # --- the endpoints ----------------------------------------------------------------------------
    async def handle(self, path: str) -> http.Response:
        if path == "/metrics":
            return http.Response(200, render(await self.collect()).encode(), CONTENT_TYPE)
        if path == "/agent-url":
            url = self.agent_url()
            return http.text(200, url) if url else http.text(404, "the VM is not running")
        return http.text(404, f"no such path {path}: /metrics, /agent-url")

    def agent_url(self) -> str:
        # the VM's channel as the sandbox started it (a vsock CID may differ from the first choice)
        cfg = self.sandbox.vm_config
        if cfg is None:
            return ""
        if isinstance(cfg.agent, VsockChannel):
            return f"vsock://{cfg.agent.guest_cid}:{cfg.agent.port}"
        return f"unix://{cfg.agent_socket}"

    async def collect(self) -> list[Family]:
        stats = await self._container_stats()
        qemu_pid = self.sandbox.pid()
        pids = {"shim": os.getpid(), **({"qemu": qemu_pid} if qemu_pid != os.getpid() else {})}
        procs = await trio.to_thread.run_sync(_read_all, pids)
        families = [self.rpc.collect(), self.rpc_errors.collect(), *self.timing.collect()]
        families += _process_families(procs)
        families += self._vm_families()
        families += [self.agent_stats.collect(), self.agent_stats_errors.collect()]
        families += _container_families(stats)
        families.append(_overhead(procs, stats))
        return families

    def _vm_families(self) -> list[Family]:
        reconciler = getattr(self.sandbox, "reconciler", None)
        if reconciler is None:
            return []
        state = reconciler.state
        return [
            gauge("kata_py_vm_vcpus", "vCPUs the VM has (hot-plugged ones included).", [({}, state.vcpus)]),
            gauge("kata_py_vm_memory_bytes", "Memory the VM has (hot-plugged memory included).",
                  [({}, state.memory_mib << 20)]),
            counter("kata_py_vm_resize_passes_total",
                    "Resize passes of the VM (vCPU/memory hot-plug toward the containers' needs).",
                    [({}, state.passes)]),
            gauge("kata_py_vm_resize_failures", "Consecutive failed resize passes (0 when the last one worked).",
                  [({}, state.failures)]),
        ]

    async def _container_stats(self) -> dict[str, ContainerStats]:
        ids = list(self.service.containers)
        if trio.current_time() - self._stats_at >= STATS_TTL_S and self._refreshing is None \
                and self._nursery is not None and ids:
            self._refreshing = trio.Event()
            self._nursery.start_soon(self._refresh, ids, self._refreshing)
        if self._refreshing is not None:
            with trio.move_on_after(STATS_WAIT_S):
                await self._refreshing.wait()
        return {cid: s for cid, s in self._stats.items() if cid in self.service.containers}

    async def _refresh(self, ids: list[str], done: trio.Event) -> None:
        fresh: dict[str, ContainerStats] = {}

        async def one(cid: str) -> None:
            t0 = time.monotonic()
            try:
                agent = self.sandbox.agent
                with trio.fail_after(STATS_CALL_TIMEOUT_S):
                    fresh[cid] = await agent.stats_container(cid)
                self.agent_stats.observe(time.monotonic() - t0)
            except Exception as exc:  # AgentError, timeout, the VM gone, a container being removed
                self.agent_stats_errors.inc()
                log.debug("stats of %s: %s", cid, exc)
                if cid in self._stats:
                    fresh[cid] = self._stats[cid]  # the last values, rather than a gap

        try:
            async with trio.open_nursery() as nursery:
                for cid in ids:
                    nursery.start_soon(one, cid)
            self._stats = fresh
            self._stats_at = trio.current_time()
        finally:
            self._refreshing = None
            done.set()


def _read_all(pids: Mapping[str, int]) -> dict[str, ProcessStats]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = read_process(pid)
        except (OSError, ValueError):
            pass  # gone between the two reads
    return out


def _process_families(procs: Mapping[str, ProcessStats]) -> list[Family]:
    cpu = counter("kata_py_process_cpu_seconds_total", "CPU time of the shim and its QEMU, by mode.")
    rss = gauge("kata_py_process_resident_memory_bytes", "Resident set size of the shim and its QEMU.")
    pss = gauge("kata_py_process_proportional_memory_bytes",
                "Proportional set size (smaps_rollup Pss) of the shim and its QEMU.")
    threads = gauge("kata_py_process_threads", "Threads of the shim and its QEMU (QEMU: one per vCPU and more).")
    fds = gauge("kata_py_process_open_fds", "Open file descriptors of the shim and its QEMU.")
    for name, p in procs.items():
        labels = {"process": name}
        cpu.add(p.user_seconds, {**labels, "mode": "user"})
        cpu.add(p.system_seconds, {**labels, "mode": "system"})
        rss.add(p.rss_bytes, labels)
        if p.pss_bytes is not None:
            pss.add(p.pss_bytes, labels)
        threads.add(p.threads, labels)
        if p.open_fds is not None:
            fds.add(p.open_fds, labels)
    return [cpu, rss, pss, threads, fds]


def _container_families(stats: Mapping[str, ContainerStats]) -> list[Family]:
    cpu = counter("kata_py_container_cpu_seconds_total",
                  "CPU time of the container's cgroup in the guest, by mode (user, system, total).")
    mem = gauge("kata_py_container_memory_usage_bytes", "Memory use of the container's cgroup in the guest.")
    limit = gauge("kata_py_container_memory_limit_bytes", "Memory limit of the container's cgroup in the guest.")
    pids = gauge("kata_py_container_pids", "Processes in the container's cgroup in the guest.")
    pids_limit = gauge("kata_py_container_pids_limit", "pids.max of the container's cgroup (0: no limit).")
    for cid, s in stats.items():
        labels = {"container_id": cid}
        cpu.add(s.cpu.total_usage_ns / 1e9, {**labels, "mode": "total"})
        cpu.add(s.cpu.user_ns / 1e9, {**labels, "mode": "user"})
        cpu.add(s.cpu.kernel_ns / 1e9, {**labels, "mode": "system"})
        mem.add(s.memory.usage, labels)
        if s.memory.limit:
            limit.add(s.memory.limit, labels)
        pids.add(s.pids.current, labels)
        pids_limit.add(s.pids.limit, labels)
    return [cpu, mem, limit, pids, pids_limit]


def _overhead(procs: Mapping[str, ProcessStats], stats: Mapping[str, ContainerStats]) -> Family:
    """The pod's memory on the host beyond what its containers use: the shim's and QEMU's PSS (RSS
    when PSS is unreadable) less the containers' cgroup usage in the guest. What RuntimeClass
    `overhead.podFixed.memory` should cover."""
    family = gauge("kata_py_pod_overhead_memory_bytes",
                   "Host memory of the pod (shim + QEMU PSS) beyond its containers' cgroup usage in the guest.")
    if "qemu" in procs:
        host = sum(p.pss_bytes if p.pss_bytes is not None else p.rss_bytes for p in procs.values())
        family.add(max(0, host - sum(s.memory.usage for s in stats.values())))
    return family
