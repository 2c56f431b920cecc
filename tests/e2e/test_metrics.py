"""Metrics for real (issue #18): two CRI pods in VMs, `kata-py monitor` serving both, Debian's
Prometheus (a private instance on 127.0.0.1, its own config and storage in a temp dir) scraping it
every second, and each pod's series read back from Prometheus's HTTP API with the pod's CRI name,
namespace and uid as labels. `kata-py metrics` prints one pod's; promtool checks both texts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.containerd import RUNTIME_HANDLER, PrivateContainerd
from tests.support.cri import CriClient, container_config, pod_config
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.vm]

PODS = {"metrics-a": ("team-a", "uid-metrics-a"), "metrics-b": ("team-b", "uid-metrics-b")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kpm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_monitor(ctd: PrivateContainerd, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config), "monitor",
                                 "--listen", "127.0.0.1:0"], stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    def port() -> int | None:
        for line in log.read_text().splitlines():
            if "serving http://127.0.0.1:" in line:
                return int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
        assert proc.poll() is None, log.read_text()
        return None
    return proc, wait_for(port, 30, "kata-py monitor listening")


def _start_prometheus(workdir: Path, target_port: int) -> tuple[subprocess.Popen[bytes], int]:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: scripts/setup-host.sh installs Debian's prometheus package"
    config = workdir / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: kata-py
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
""")
    port = _free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=workdir)
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    wait_for(ready, 60, "prometheus ready")
    return proc, port


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        answer = json.load(r)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _promtool_check(text: bytes) -> None:
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), (done, text[:3000])


def test_prometheus_scrapes_every_pod_through_the_monitor(cri_env: tuple[PrivateContainerd, CriClient, str],
                                                          workdir: Path):
    ctd, client, busybox = cri_env
    pods: dict[str, str] = {}
    containers: dict[str, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, (namespace, uid) in PODS.items():
            config = pod_config(name, namespace=namespace, uid=uid)
            pods[name] = client.run_pod_sandbox(config, RUNTIME_HANDLER)
            cid = client.create_container(pods[name], container_config(
                "app", busybox, ["sh", "-c", "while :; do sleep 1; done"]), config)
            client.start_container(cid)
            containers[name] = cid
        assert len(qemu_pids(ctd)) == 2

        # one pod's metrics, as its shim serves them
        done = subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config), "metrics",
                               pods["metrics-a"][:12]], capture_output=True, timeout=60)
        assert done.returncode == 0, done
        assert f'kata_py_container_memory_usage_bytes{{container_id="{containers["metrics-a"]}"}}'.encode() in done.stdout
        assert b'kata_py_shim_rpc_duration_seconds_count{method="Create"}' in done.stdout
        _promtool_check(done.stdout)

        monitor, monitor_port = _start_monitor(ctd, workdir / "monitor.log")
        procs.append(monitor)
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/metrics", timeout=30) as r:
            aggregated = r.read()
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        _promtool_check(aggregated)
        print(f"[metrics] monitor scrape of 2 pods: {len(aggregated)} bytes", file=sys.stderr)

        prometheus, prom_port = _start_prometheus(workdir, monitor_port)
        procs.append(prometheus)
        for name, (namespace, uid) in PODS.items():
            selector = f'{{cri_pod_name="{name}",cri_pod_namespace="{namespace}",cri_pod_uid="{uid}"}}'
            series = wait_for(lambda s=selector: _query(prom_port, f"kata_py_container_memory_usage_bytes{s}") or None,
                              60, f"{name}'s series in prometheus")
            by_container = {s["metric"]["container_id"]: s for s in series}
            assert containers[name] in by_container, series  # the workload's, next to the pause container's
            metric = by_container[containers[name]]["metric"]
            assert metric["sandbox_id"] == pods[name] and metric["job"] == "kata-py", metric
            assert float(by_container[containers[name]]["value"][1]) > 0
            [up] = _query(prom_port, f"kata_py_monitor_shim_up{selector}")
            assert up["value"][1] == "1", up
            [boots] = _query(prom_port, f"sum by (boot) (kata_py_sandbox_boots_total{selector})")
            assert boots["metric"]["boot"] in ("pool", "template", "cold") and boots["value"][1] == "1", boots
            [qemu] = _query(prom_port, f'kata_py_process_resident_memory_bytes{{process="qemu",cri_pod_name="{name}"}}')
            assert float(qemu["value"][1]) > 50 << 20, qemu  # a booted guest's RAM
            assert _query(prom_port, f'kata_py_shim_rpc_duration_seconds_count{{method="Create",cri_pod_name="{name}"}}')
        # series of the two pods are told apart: two QEMUs, two sandboxes
        assert len(_query(prom_port, 'kata_py_process_threads{process="qemu"}')) == 2
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for pod_id in pods.values():
            client.stop_pod_sandbox(pod_id)
            client.remove_pod_sandbox(pod_id)
    wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")
    assert not any(os.path.exists(p) for p in ctd.kata_state.glob("sandboxes/*/shim-monitor.sock"))
