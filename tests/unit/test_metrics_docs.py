"""Every metric the shim and the monitor serve is in docs/architecture.md's Metrics table (and
nothing else is), and the Grafana dashboard asks only for metrics that exist."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

from agent_client.protocol import ContainerStats
from shim.metrics.aggregate import Monitor
from shim.metrics.pod import PodMetrics
from shim.metrics.procfs import ProcessStats

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_sum", "_count")


def documented() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(kata_py_[a-z0-9_]+)`", section, re.M))


async def served(tmp_path: Path) -> set[str]:
    sandbox = SimpleNamespace(id="s", state_dir=tmp_path, boot="cold", agent=None, pid=lambda: os.getpid(),
                              reconciler=SimpleNamespace(state=SimpleNamespace(vcpus=1, memory_mib=512, passes=1,
                                                                               failures=0)))
    metrics = PodMetrics(sandbox, SimpleNamespace(containers={}))  # type: ignore[arg-type]
    names = {f.name for f in await metrics.collect()}
    names |= {f.name for f in Monitor(tmp_path)._families()}
    # the process and container families are made whatever their samples: all named above
    from shim.metrics.pod import _container_families, _process_families
    names |= {f.name for f in _process_families({"qemu": ProcessStats(0, 0, 1, 0, 0, 0)})}
    names |= {f.name for f in _container_families({"c": ContainerStats()})}
    return names


async def test_docs_list_every_metric_served(tmp_path: Path):
    assert await served(tmp_path) == documented()


def test_dashboard_asks_for_existing_metrics():
    dashboard = json.loads((REPO / "packaging" / "grafana" / "kata-py-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    asked = set()
    for expr in exprs:
        for name in re.findall(r"kata_py_[a-z0-9_]+", expr):
            for suffix in SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in documented():
                    name = name.removesuffix(suffix)
            asked.add(name)
    assert asked and asked <= documented(), asked - documented()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
