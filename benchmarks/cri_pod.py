"""A Kubernetes pod start through containerd's CRI plugin, as kubelet drives it: RunPodSandbox (with a
CNI bridge network namespace) → CreateContainer → StartContainer, then StopPodSandbox +
RemovePodSandbox; runc, kata-py from a template and kata-py from the pool, side by side.

    python3 benchmarks/cri_pod.py [--runs 3] [--pool-size 2]

One private containerd with the CRI plugin (tests/support/containerd.py) and a bridge + host-local
CNI network; kata-py's mode is switched between runs through its config file (as start_modes.py
does); runs are interleaved. The template is built up front (`kata-py template build`); the pool is a
`kata-py pool` service started here (ready VMs and a spare shim). Takes /tmp/kata-py-vm.lock itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

from benchmarks._table import STATS_HEADERS, stats_row, table, vm_lock  # noqa: E402
from benchmarks.ctr_run import progress, schedule, timing_lines  # noqa: E402
from benchmarks.start_modes import set_mode, start_pool, stop_everything  # noqa: E402
from tests.support.containerd import RUNTIME_HANDLER, PrivateContainerd  # noqa: E402
from tests.support.cri import CriClient, container_config, pod_config  # noqa: E402

STEPS = ("RunPodSandbox", "CreateContainer", "StartContainer", "pod running (sum)", "Stop+RemovePodSandbox")


def cni_network(ctd: PrivateContainerd, bridge: str) -> None:
    ctd.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    (ctd.cni_conf_dir / "10-bench.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "kp-bench", "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.9.0/24"}]],
                     "dataDir": str(ctd.dir / "ipam")}}]}))


def one_pod(client: CriClient, image: str, handler: str, name: str) -> dict[str, Any]:
    pod = pod_config(name, host_network=False)
    t0 = time.monotonic()
    pod_id = client.run_pod_sandbox(pod, handler)
    t1 = time.monotonic()
    cid = client.create_container(pod_id, container_config(name, image, ["sh", "-c", "sleep 1000"]), pod)
    t2 = time.monotonic()
    client.start_container(cid)
    t3 = time.monotonic()
    client.stop_pod_sandbox(pod_id)
    client.remove_pod_sandbox(pod_id)
    t4 = time.monotonic()
    return {"RunPodSandbox": t1 - t0, "CreateContainer": t2 - t1, "StartContainer": t3 - t2,
            "pod running (sum)": t3 - t0, "Stop+RemovePodSandbox": t4 - t3, "pod": pod_id, "container": cid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="pods per mode (default 3)")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--keep-log", help="copy containerd's log (shim logs included) to this file")
    args = parser.parse_args()
    modes = ["runc", "template", "pool"]
    bridge = f"kpbench{os.getpid() % 10000}"
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    timings: dict[tuple[str, str], dict[str, float]] = {}
    with vm_lock():
        ctd = PrivateContainerd(cri=True)
        pool = None
        try:
            cni_network(ctd, bridge)
            base = ctd.kata_config.read_text()
            templates, pool_sock = ctd.dir / "templates", ctd.dir / "pool" / "pool.sock"
            set_mode(ctd, base, "template", templates, pool_sock)
            ctd.start()
            image, _pause = ctd.import_cri_images()
            progress("building the template (`kata-py template build`, as at install time)")
            subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config), "template", "build"],
                           check=True, timeout=900)
            pool = start_pool(ctd, args.pool_size, pool_sock)
            with CriClient(ctd.cri_address) as client:
                one_pod(client, image, RUNTIME_HANDLER, "warm-kata")  # uncounted: first use of each path
                try:
                    one_pod(client, image, "runc", "warm-runc")
                except grpc.RpcError as exc:  # e.g. runc's CRI pods fail on this cgroup-v1 CI host
                    progress(f"runc pods fail here, left out: {exc.details()}")  # type: ignore[attr-defined]
                    modes.remove("runc")
                    del results["runc"]
                for i, mode in enumerate(schedule({m: args.runs for m in modes})):
                    if mode != "runc":
                        set_mode(ctd, base, mode, templates, pool_sock)
                        if mode == "pool":
                            time.sleep(8.0)  # a pool VM waiting to be used has warmed itself up
                    took = one_pod(client, image, "runc" if mode == "runc" else RUNTIME_HANDLER, f"{mode}-{i}")
                    results[mode].append(took)
                    progress(f"{mode}-{i}: pod running in {took['pod running (sum)']:.2f} s")
            timings = timing_lines(ctd.log)
            if args.keep_log:
                shutil.copyfile(ctd.log, args.keep_log)
        finally:
            stop_everything(ctd, pool)
            subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
    print("\nCRI pod start (bridge CNI netns, one busybox container), seconds: median per step")
    rows = [[step, *[stats_row(step, [r[step] for r in results[m]])[1] for m in modes]] for step in STEPS]
    print(table(["", *modes], rows))
    kata = [m for m in modes if m != "runc"]
    print("\nkata-py: the pod sandbox's start (pause container), seconds (median; shim timing lines)")
    phases = sorted({k for m in kata for r in results[m] for k in timings.get(("sandbox", r["pod"]), {})},
                    key=lambda k: (k == "total", k))
    print(table(["", *kata], [[ph, *[stats_row(ph, [timings.get(("sandbox", r["pod"]), {}).get(ph)
                                                    for r in results[m]])[1] for m in kata]] for ph in phases]))
    print("\npod running (RunPodSandbox + CreateContainer + StartContainer), seconds")
    print(table(STATS_HEADERS, [stats_row(m, [r["pod running (sum)"] for r in results[m]]) for m in modes]))


if __name__ == "__main__":
    main()
