"""A clone's warm-up (agent/warm_up.py) runs a real throwaway container with the real runc/crun and
leaves nothing behind: no container, no runtime state, no rootfs, no cgroup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.component.conftest import _IN_CGROUP2_NS, REPO

SCRIPT = """
import json, os, sys
from agent import boot
from agent.app import Agent
boot.become_subreaper()  # as `python -m agent` does: the container's init is ours to reap
root, runtime = sys.argv[1], sys.argv[2]
os.makedirs(root, mode=0o700)
agent = Agent(root=root, address=f"unix:{root}/a.sock", runtime=runtime)
agent.start()
try:
    status = agent.warm.clone()
    left = {"containers": [c.id for c in agent.containers.all()],
            "runtime": agent.runtime.list_ids(),
            "rootfs": os.path.exists(os.path.join(root, "warm-up-rootfs")),
            # the warm-up container's cgroup (other agents on this host may have theirs meanwhile)
            "cgroups": [d for d, _, _ in os.walk("/sys/fs/cgroup/kata-py") if "kata-py-warm-up" in d]}
finally:
    agent.stop()
print(json.dumps({"status": status, **left}))
"""


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_clone_warm_up_runs_a_container_and_leaves_nothing(tmp_path: Path, runtime: str,
                                                            agent_runtime_problems: dict[str, str]) -> None:
    if agent_runtime_problems[runtime]:
        pytest.skip(agent_runtime_problems[runtime])
    done = subprocess.run([*_IN_CGROUP2_NS, sys.executable, "-c", SCRIPT, str(tmp_path / "root"), runtime],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "clone warm-up" not in done.stderr, done.stderr  # no warning: every step worked
    assert result == {"status": 0, "containers": [], "runtime": [], "rootfs": False, "cgroups": []}, done.stderr
