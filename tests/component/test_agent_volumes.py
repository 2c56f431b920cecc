"""Pod volumes in the real agent (runc/crun): an ephemeral (tmpfs) volume is mounted once for the
pod, shared by the containers naming it, and unmounted when the last of them is removed; a local one
is a directory that goes the same way."""

import json
from pathlib import Path

import grpc
import pytest

from protos.agent.v1 import agent_pb2 as pb

from .conftest import RPC_TIMEOUT, AgentProcess, agent_oci_spec


def agent_mounts(agent: AgentProcess) -> dict[str, str]:
    """Mount point -> filesystem type, as the agent (in its own mount namespace) sees them."""
    out = {}
    for line in Path(f"/proc/{agent.proc.pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        out[fields[4]] = fields[fields.index("-") + 1]
    return out


def create(agent: AgentProcess, cid: str, args: list[str], volumes: dict[str, pb.Storage]) -> None:
    """A busybox container with each storage bind-mounted at its key (under /tmp: the image is read-only),
    as the shim's spec does."""
    spec = agent_oci_spec(args)
    spec["mounts"] += [{"destination": dest, "type": "bind", "source": s.mount_point, "options": ["rbind", "rw"]}
                       for dest, s in volumes.items()]
    agent.stub.CreateContainer(pb.CreateContainerRequest(
        container_id=cid, oci_spec_json=json.dumps(spec).encode(), storages=list(volumes.values()),
        rootfs=pb.Storage(driver="bind", source=str(agent.root / "img" / "busybox"),
                          mount_point=str(agent.root / "containers-rootfs" / cid))), timeout=RPC_TIMEOUT)
    agent.stub.StartContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)


def run(agent: AgentProcess, cid: str, script: str) -> tuple[int, bytes]:
    proc = {"args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    exec_id = f"x{abs(hash(script)) % 10**8}"
    agent.stub.ExecProcess(pb.ExecProcessRequest(container_id=cid, exec_id=exec_id,
                                                 process_json=json.dumps(proc).encode()), timeout=RPC_TIMEOUT)
    out = b"".join(c.data for c in agent.stub.ReadStdout(pb.ProcessRequest(container_id=cid, exec_id=exec_id),
                                                           timeout=RPC_TIMEOUT))
    status = agent.stub.WaitProcess(pb.ProcessRequest(container_id=cid, exec_id=exec_id), timeout=RPC_TIMEOUT)
    return status.status, out


def remove(agent: AgentProcess, cid: str) -> None:
    agent.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=cid, timeout_seconds=10),
                               timeout=RPC_TIMEOUT)


def test_pod_volumes_are_shared_and_go_with_their_last_user(agent: AgentProcess) -> None:
    cache = agent.root / "sandbox" / "ephemeral" / "cache"
    scratch = agent.root / "sandbox" / "local" / "scratch"
    volumes = {
        "/tmp/cache": pb.Storage(driver="ephemeral", source="tmpfs", fstype="tmpfs", mount_point=str(cache),
                             options=["size=4194304", "mode=1777"]),
        "/tmp/scratch": pb.Storage(driver="local", source="local", fstype="local", mount_point=str(scratch),
                               options=["mode=0777"]),
    }
    made = []
    try:
        for cid in ("vol-a", "vol-b"):
            create(agent, cid, ["sleep", "1000"], volumes)
            made.append(cid)
        assert agent_mounts(agent).get(str(cache)) == "tmpfs"
        assert str(scratch) not in agent_mounts(agent) and scratch.is_dir()
        assert run(agent, "vol-a", "echo hi > /tmp/cache/f; echo there > /tmp/scratch/g") == (0, b"")
        code, out = run(agent, "vol-b", "cat /tmp/cache/f /tmp/scratch/g; grep ' /tmp/cache ' /proc/mounts")
        assert code == 0 and out.startswith(b"hi\nthere\n") and b" tmpfs " in out and b"size=4096k" in out
        # the tmpfs of the pod, not of a container: b still sees a's file after a is gone
        remove(agent, "vol-a")
        made.remove("vol-a")
        assert run(agent, "vol-b", "cat /tmp/cache/f /tmp/scratch/g") == (0, b"hi\nthere\n")
        assert str(cache) in agent_mounts(agent)
        # the last user gone: the volumes go
        remove(agent, "vol-b")
        made.remove("vol-b")
        assert str(cache) not in agent_mounts(agent)
        assert not cache.exists() and not scratch.exists()
    finally:
        for cid in made:
            remove(agent, cid)


def test_a_volume_outside_the_sandbox_directory_is_refused(agent: AgentProcess) -> None:
    bad = pb.Storage(driver="local", source="local", mount_point=str(agent.root / "containers"))
    with pytest.raises(grpc.RpcError) as e:
        create(agent, "vol-bad", ["true"], {"/x": bad})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (agent.root / "containers").is_dir()  # untouched
