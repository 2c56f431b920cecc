"""Metrics cost (issue #18): scrape size and time of one shim and of `kata-py monitor`, and the
shim-to-agent StatsContainer call the per-container series need.

    python3 benchmarks/metrics.py [--pods 2] [--scrapes 10]

CRI pods (one busybox container each) in a private containerd with the CRI plugin, from the
template. Each shim's socket is scraped `--scrapes` times right after one another (served from its
cache: no agent call) and `--scrapes` times 2.2 s apart (each refreshes the agent stats, the
scrape waits for them). The StatsContainer time is the shim's own histogram
(kata_py_agent_stats_duration_seconds: sum/count, the call as the shim sees it). Then `kata-py
monitor` serves all pods: its answer's size and time. Takes /tmp/kata-py-vm.lock itself.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

from benchmarks._table import table, vm_lock  # noqa: E402
from shim.layout import sandbox_state_dir  # noqa: E402
from shim.metrics.http import get_unix  # noqa: E402
from shim.metrics.parse import parse  # noqa: E402
from shim.metrics.pod import SOCKET_NAME  # noqa: E402
from tests.support.containerd import RUNTIME_HANDLER, PrivateContainerd  # noqa: E402
from tests.support.cri import CriClient, container_config, pod_config  # noqa: E402


def scrape(sock: Path) -> tuple[float, bytes]:
    t0 = time.monotonic()
    status, body = trio.run(lambda: get_unix(str(sock), "/metrics", timeout=30, max_bytes=1 << 26))
    assert status == 200, body
    return time.monotonic() - t0, body


def agent_stats_mean(body: bytes) -> tuple[float, int]:
    for family in parse(body.decode()):
        if family.name == "kata_py_agent_stats_duration_seconds":
            total = sum(s.value for s in family.samples if s.suffix == "_sum")
            count = int(sum(s.value for s in family.samples if s.suffix == "_count"))
            return (total / count if count else float("nan")), count
    return float("nan"), 0


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--scrapes", type=int, default=10)
    args = ap.parse_args()
    with vm_lock():
        ctd = PrivateContainerd(cri=True).start()
        monitor: subprocess.Popen[bytes] | None = None
        pods: list[str] = []
        try:
            busybox, _ = ctd.import_cri_images()
            with CriClient(ctd.cri_address) as client:
                for n in range(args.pods):
                    config = pod_config(f"bench-{n}", namespace="bench")
                    pods.append(client.run_pod_sandbox(config, RUNTIME_HANDLER))
                    cid = client.create_container(pods[-1], container_config(
                        "app", busybox, ["sh", "-c", "while :; do sleep 1; done"]), config)
                    client.start_container(cid)
                    print(f"[metrics] pod {n} running", file=sys.stderr)
                rows = []
                for n, pod_id in enumerate(pods):
                    sock = sandbox_state_dir(ctd.kata_state, pod_id) / SOCKET_NAME
                    scrape(sock)  # the first: its refresh
                    cached = [scrape(sock)[0] for _ in range(args.scrapes)]
                    refreshing = []
                    for _ in range(args.scrapes):
                        time.sleep(2.2)
                        took, body = scrape(sock)
                        refreshing.append(took)
                    mean, calls = agent_stats_mean(body)
                    rows.append([f"bench-{n}", len(body), ms(cached), ms(refreshing), f"{mean * 1000:.1f}", calls])
                print(table(["pod", "shim scrape bytes", "scrape ms, cached", "scrape ms, refreshing agent stats",
                             "StatsContainer ms (mean)", "calls"], rows))
                log = ctd.dir / "monitor.log"
                with open(log, "wb") as out:
                    monitor = subprocess.Popen([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config),
                                                "monitor", "--listen", "127.0.0.1:0"], stdout=out, stderr=out)
                deadline = time.monotonic() + 30
                while "serving http://" not in log.read_text():
                    assert time.monotonic() < deadline and monitor.poll() is None, log.read_text()
                    time.sleep(0.1)
                port = int(log.read_text().split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
                times, size = [], 0
                for _ in range(args.scrapes):
                    t0 = time.monotonic()
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                        size = len(r.read())
                    times.append(time.monotonic() - t0)
                print(table(["pods", "monitor scrape bytes", "bytes per pod", "monitor scrape ms (5 s cache)"],
                            [[args.pods, size, size // max(1, args.pods), ms(times)]]))
                for pod_id in pods:
                    client.stop_pod_sandbox(pod_id)
                    client.remove_pod_sandbox(pod_id)
        finally:
            if monitor is not None:
                monitor.terminate()
                monitor.wait(10)
            ctd.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
