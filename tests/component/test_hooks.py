"""OCI hooks run on the host, in the pod's network namespace, with the OCI state on stdin."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from shim.errors import FailedPrecondition, InvalidArgument
from shim.hooks import oci_state, parse_hooks, run_hooks
from shim.network.netns import run_in_netns


@pytest.fixture
def netns():
    name = f"kpnet-hook-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def write_hook(tmp_path: Path, body: str) -> str:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n" + body)
    hook.chmod(0o755)
    return str(hook)


def test_prestart_hook_runs_in_the_netns_with_the_state(tmp_path: Path, netns: str):
    out = tmp_path / "out"
    hook = write_hook(tmp_path, f'cat > {out}.state; echo "$1 $HOOKVAR" > {out}.args; '
                                f'readlink /proc/self/ns/net > {out}.ns\n')
    spec = {"hooks": {"prestart": [{"path": hook, "args": ["my-hook", "first"], "env": ["HOOKVAR=v"]}]}}
    hooks = parse_hooks(spec, "prestart")
    run_in_netns(netns, lambda: run_hooks(hooks, oci_state("sbx", "/b", 42, "created", {"a": "b"}), "prestart"))
    state = json.loads((tmp_path / "out.state").read_text())
    assert (state["id"], state["pid"], state["bundle"], state["status"]) == ("sbx", 42, "/b", "created")
    assert (tmp_path / "out.args").read_text().split() == ["first", "v"]  # (a script sees its path as $0)
    assert (tmp_path / "out.ns").read_text().strip() != os.readlink("/proc/self/ns/net")  # not ours


def test_failing_or_slow_hook_is_a_clear_error(tmp_path: Path):
    failing = parse_hooks({"hooks": {"prestart": [{"path": write_hook(tmp_path, "echo nope >&2; exit 3\n")}]}},
                          "prestart")
    with pytest.raises(FailedPrecondition, match="exited 3: nope"):
        run_hooks(failing, b"{}", "prestart")
    slow = parse_hooks({"hooks": {"prestart": [{"path": "/bin/sleep", "args": ["sleep", "5"], "timeout": 1}]}},
                       "prestart")
    with pytest.raises(FailedPrecondition, match="timed out"):
        run_hooks(slow, b"{}", "prestart")


@pytest.mark.parametrize("bad", [{"path": "relative"}, {"path": "/x", "timeout": 0}, {"path": "/x", "args": [1]}])
def test_malformed_hooks_name_the_field(bad):
    with pytest.raises(InvalidArgument, match=r"hooks\.prestart\[0\]"):
        parse_hooks({"hooks": {"prestart": [bad]}}, "prestart")
