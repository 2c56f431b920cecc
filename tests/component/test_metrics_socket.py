"""The shim's management socket (shim/metrics/pod.py) for real: a unix socket in a temp state dir,
HTTP over it, a FakeAgent for the guest's answers and a real process standing in for QEMU's /proc."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import ttrpc
from agent_client.fake import FakeAgent
from agent_client.protocol import ContainerStats, CpuStats, MemoryStats, PidsStats, Storage
from shim.metrics import http, pod
from shim.metrics.exposition import Family
from shim.metrics.parse import parse

CRI = {"io.kubernetes.cri.sandbox-name": "web", "io.kubernetes.cri.sandbox-namespace": "team-a",
       "io.kubernetes.cri.sandbox-uid": "uid-123", "io.kubernetes.cri.container-type": "sandbox"}


@dataclass
class FakeContainer:
    id: str
    is_sandbox: bool
    spec: dict[str, Any]


@dataclass
class FakeService:
    containers: dict[str, FakeContainer] = field(default_factory=dict)


class FakeSandbox:
    def __init__(self, state_dir: Path, qemu_pid: int) -> None:
        self.id = "sbx-1"
        self.state_dir = state_dir
        self.boot = ""
        self.agent = FakeAgent()
        self.vm_config: Any = None  # no VM yet
        self._qemu_pid = qemu_pid

    def pid(self) -> int:
        return self._qemu_pid


@pytest.fixture
def qemu_stand_in() -> AsyncIterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


async def _setup(tmp_path: Path, qemu_pid: int, nursery: trio.Nursery) -> tuple[pod.PodMetrics, FakeSandbox]:
    state = tmp_path / "sandboxes" / "sbx-1"
    state.mkdir(parents=True, mode=0o700)
    sandbox = FakeSandbox(state, qemu_pid)
    service = FakeService({"sbx-1": FakeContainer("sbx-1", True, {"annotations": CRI}),
                           "app": FakeContainer("app", False, {"annotations": {}})})
    await sandbox.agent.create_sandbox("h", (), (), "sbx-1", "m")
    for cid in service.containers:
        await sandbox.agent.create_container(cid, {}, Storage("", "", "/r"))
    sandbox.agent.containers["app"].stats = ContainerStats(
        CpuStats(total_usage_ns=3_000_000_000, user_ns=2_000_000_000, kernel_ns=1_000_000_000),
        MemoryStats(usage=5 << 20, limit=64 << 20), PidsStats(current=2, limit=100))
    metrics = pod.PodMetrics(sandbox, service)
    await nursery.start(metrics.serve)
    return metrics, sandbox


async def _create(metrics: pod.PodMetrics, sandbox: FakeSandbox, fail: bool = False) -> None:
    async def create(ctx: ttrpc.RequestContext, request: Any) -> Any:
        sandbox.boot = "template"  # what VmSandbox.start() sets last
        if fail:
            from shim.errors import NotFound
            raise NotFound("container x")
        return None

    table = metrics.instrument({"Create": ttrpc.Method(object, create)})  # type: ignore[arg-type]
    ctx = ttrpc.RequestContext("containerd.task.v2.Task", "Create", (), float("inf"))
    try:
        await table["Create"].handler(ctx, object())
    except Exception:
        if not fail:
            raise


async def _get(sandbox: FakeSandbox, target: str = "/metrics") -> tuple[int, bytes]:
    return await http.get_unix(str(sandbox.state_dir / pod.SOCKET_NAME), target, timeout=10, max_bytes=1 << 24)


async def _wait_socket(metrics: pod.PodMetrics) -> None:
    with trio.fail_after(5):
        await metrics.serving.wait()


def _by_name(families: list[Family]) -> dict[str, Family]:
    return {f.name: f for f in families}


def _value(family: Family, suffix: str = "", **labels: str) -> float:
    matches = [s.value for s in family.samples if s.suffix == suffix and set(labels.items()) <= set(s.labels)]
    assert len(matches) == 1, (family, labels)
    return matches[0]


async def test_socket_serves_the_pods_metrics(tmp_path: Path, qemu_stand_in: int, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, "shim.timing")  # as the daemon logs (INFO or DEBUG)
    async with trio.open_nursery() as nursery:
        metrics, sandbox = await _setup(tmp_path, qemu_stand_in, nursery)
        await trio.sleep(0.05)
        assert not (sandbox.state_dir / pod.SOCKET_NAME).exists()  # not before the sandbox runs
        await _create(metrics, sandbox)
        await _wait_socket(metrics)
        sock = sandbox.state_dir / pod.SOCKET_NAME
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert json.loads((sandbox.state_dir / pod.POD_FILE).read_text()) == {
            "sandbox_id": "sbx-1", "cri_pod_name": "web", "cri_pod_namespace": "team-a", "cri_pod_uid": "uid-123"}
        assert stat.S_IMODE((sandbox.state_dir / pod.POD_FILE).stat().st_mode) == 0o600
        logging.getLogger("shim.timing").info("timing sandbox=sbx-1 vm_restore=0.75 agent_ready=0.125 "
                                              "accel=tcg boot=template total=0.875")

        status, body = await _get(sandbox)
        assert status == 200
        families = _by_name(parse(body.decode()))
        assert _value(families["kata_py_shim_rpc_duration_seconds"], "_count", method="Create") == 1
        assert _value(families["kata_py_sandbox_boots_total"], boot="template", accel="tcg") == 1
        assert _value(families["kata_py_sandbox_start_phase_duration_seconds"], "_sum", phase="vm_restore") == 0.75
        cpu = families["kata_py_container_cpu_seconds_total"]
        assert _value(cpu, container_id="app", mode="total") == 3.0
        assert _value(cpu, container_id="app", mode="system") == 1.0
        assert _value(families["kata_py_container_memory_usage_bytes"], container_id="app") == 5 << 20
        assert _value(families["kata_py_container_pids_limit"], container_id="app") == 100
        assert _value(families["kata_py_agent_stats_duration_seconds"], "_count") == 2
        for process in ("shim", "qemu"):
            assert _value(families["kata_py_process_resident_memory_bytes"], process=process) > 0
            assert _value(families["kata_py_process_threads"], process=process) >= 1
            assert _value(families["kata_py_process_open_fds"], process=process) >= 3
        assert _value(families["kata_py_process_proportional_memory_bytes"], process="qemu") > 0
        assert _value(families["kata_py_pod_overhead_memory_bytes"]) > 0

        promtool = shutil.which("promtool")
        assert promtool, "promtool missing: scripts/setup-host.sh installs Debian's prometheus package"
        done = await trio.run_process([promtool, "check", "metrics"], stdin=body, capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert done.returncode == 0 and not done.stdout.strip(), done

        assert await _get(sandbox, "/agent-url") == (404, b"the VM is not running\n")
        assert (await _get(sandbox, "/nope"))[0] == 404
        nursery.cancel_scope.cancel()


async def test_a_slow_guest_never_holds_a_scrape(tmp_path: Path, qemu_stand_in: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pod, "STATS_TTL_S", 0.0)
    monkeypatch.setattr(pod, "STATS_WAIT_S", 0.3)
    monkeypatch.setattr(pod, "STATS_CALL_TIMEOUT_S", 1.0)
    async with trio.open_nursery() as nursery:
        metrics, sandbox = await _setup(tmp_path, qemu_stand_in, nursery)
        await _create(metrics, sandbox, fail=True)
        await _wait_socket(metrics)
        families = _by_name(parse((await _get(sandbox))[1].decode()))
        assert _value(families["kata_py_shim_rpc_errors_total"], method="Create", code="NOT_FOUND") == 1
        assert _value(families["kata_py_container_memory_usage_bytes"], container_id="app") == 5 << 20

        sandbox.agent.hang("stats_container")
        t0 = time.monotonic()
        families = _by_name(parse((await _get(sandbox))[1].decode()))
        assert time.monotonic() - t0 < 0.9  # the wait, not the agent's call, bounds the scrape
        # the last values are served meanwhile
        assert _value(families["kata_py_container_memory_usage_bytes"], container_id="app") == 5 << 20
        await trio.sleep(1.2)  # the stuck calls time out in the background
        families = _by_name(parse((await _get(sandbox))[1].decode()))
        assert _value(families["kata_py_agent_stats_errors_total"]) >= 2
        assert _value(families["kata_py_container_memory_usage_bytes"], container_id="app") == 5 << 20
        nursery.cancel_scope.cancel()


async def test_http_edges(tmp_path: Path, qemu_stand_in: int):
    async with trio.open_nursery() as nursery:
        metrics, sandbox = await _setup(tmp_path, qemu_stand_in, nursery)
        await _create(metrics, sandbox)
        await _wait_socket(metrics)
        path = str(sandbox.state_dir / pod.SOCKET_NAME)

        async def raw(data: bytes) -> bytes:
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(data)
                out = b""
                with trio.fail_after(10):
                    while chunk := await stream.receive_some(65536):
                        out += chunk
            return out

        assert (await raw(b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await raw(b"GET metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")).startswith(b"HTTP/1.1 431 ")
        head = await raw(b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        assert b"Content-Type: text/plain; version=0.0.4" in head
        nursery.cancel_scope.cancel()


def test_pod_identity_and_agent_url():
    assert pod.pod_identity("s", {}) == {"sandbox_id": "s", "cri_pod_name": "", "cri_pod_namespace": "",
                                         "cri_pod_uid": ""}
    assert pod.pod_identity("s", {"io.kubernetes.cri-o.KubeName": "x", "io.kubernetes.cri.sandbox-uid": 5}) == \
        {"sandbox_id": "s", "cri_pod_name": "x", "cri_pod_namespace": "", "cri_pod_uid": ""}
    from vmm.config import SerialChannel, VsockChannel

    def vm(channel: Any) -> Any:  # the two fields of a VmConfig that the URL comes from
        return type("Cfg", (), {"agent": channel, "agent_socket": Path("/s/agent.sock")})()

    sandbox = FakeSandbox(Path("/s"), os.getpid())
    metrics = pod.PodMetrics(sandbox, FakeService())
    assert metrics.agent_url() == ""
    sandbox.vm_config = vm(SerialChannel())
    assert metrics.agent_url() == "unix:///s/agent.sock"
    sandbox.vm_config = vm(VsockChannel(guest_cid=7))
    assert metrics.agent_url() == "vsock://7:1024"


async def test_monitor_labels_and_caches_every_pod(tmp_path: Path, qemu_stand_in: int):
    from shim.metrics import aggregate

    async with trio.open_nursery() as nursery:
        metrics, sandbox = await _setup(tmp_path, qemu_stand_in, nursery)
        await _create(metrics, sandbox)
        await _wait_socket(metrics)
        # a second pod's dir whose shim is gone (a stale socket): down, not fatal
        dead = tmp_path / "sandboxes" / "0123456789abcdef01234567"
        dead.mkdir()
        (dead / pod.SOCKET_NAME).touch()
        (tmp_path / "sandboxes" / "no-socket").mkdir()  # not started yet: not listed
        monitor = aggregate.Monitor(tmp_path)
        families = _by_name(await monitor.collect())
        up = families["kata_py_monitor_shim_up"]
        assert _value(up, sandbox_id="sbx-1", cri_pod_name="web", cri_pod_namespace="team-a", cri_pod_uid="uid-123") == 1
        assert _value(up, sandbox_id=dead.name, cri_pod_name="") == 0
        assert _value(families["kata_py_monitor_sandboxes"]) == 2
        mem = families["kata_py_container_memory_usage_bytes"]
        assert _value(mem, container_id="app", cri_pod_name="web", cri_pod_uid="uid-123") == 5 << 20
        scrapes = len(sandbox.agent.calls)
        await monitor.collect()  # within SCRAPE_TTL_S: the shim is not asked again
        assert len(sandbox.agent.calls) == scrapes
        text = (await monitor.handle("/metrics")).body
        done = await trio.run_process(["promtool", "check", "metrics"], stdin=text, capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert done.returncode == 0 and not done.stdout.strip(), done
        assert aggregate.find_sandbox(tmp_path, "sbx") == sandbox.state_dir  # a unique prefix
        assert aggregate.find_sandbox(tmp_path, "zzz") is None
        nursery.cancel_scope.cancel()


def test_parse_listen():
    from shim.metrics.aggregate import parse_listen

    assert parse_listen("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8090", "host:", ":80", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)
