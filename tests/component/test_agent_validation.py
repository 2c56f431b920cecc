"""The agent refuses bad ids and paths with INVALID_ARGUMENT naming the field, and unknown objects
with NOT_FOUND; the agent process exits cleanly on SIGTERM even with containers running."""

import json
import os
import shutil

import grpc
import pytest

from protos.agent.v1 import agent_pb2 as pb

from .conftest import RPC_TIMEOUT, AgentProcess, agent_oci_spec


def _code(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=RPC_TIMEOUT)
    return e.value.code(), e.value.details()


@pytest.mark.parametrize("cid", ["", "../x", "-rf", "a/b", "x" * 129, "a b", ".hidden"])
def test_bad_container_ids_rejected(agent: AgentProcess, cid: str) -> None:
    code, msg = _code(agent.stub.StartContainer, pb.ContainerRequest(container_id=cid))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "container_id" in msg


def test_bad_exec_id_rejected(agent: AgentProcess) -> None:
    code, msg = _code(agent.stub.WaitProcess, pb.ProcessRequest(container_id="c1", exec_id="../../x"))
    assert (code, "exec_id" in msg) == (grpc.StatusCode.INVALID_ARGUMENT, True)


def _create(agent: AgentProcess, cid: str, rootfs: pb.Storage, storages=(), spec: bytes | None = None):
    return agent.stub.CreateContainer(pb.CreateContainerRequest(
        container_id=cid, oci_spec_json=spec or json.dumps(agent_oci_spec(["true"])).encode(),
        rootfs=rootfs, storages=list(storages)), timeout=RPC_TIMEOUT)


def _rooted(template: pb.Storage, agent: AgentProcess) -> pb.Storage:
    s = pb.Storage()
    s.CopyFrom(template)  # the parameters are shared by both runtimes' runs: never mutate them
    s.mount_point = s.mount_point.format(root=agent.root)
    s.source = s.source.format(root=agent.root)
    return s


@pytest.mark.parametrize("field,rootfs,storages", [
    ("rootfs.mount_point", pb.Storage(mount_point="/etc"), []),
    ("rootfs.mount_point", pb.Storage(mount_point="relative/path"), []),
    ("rootfs.source", pb.Storage(driver="bind", source="/etc", mount_point="{root}/r"), []),
    ("rootfs.mount_point", pb.Storage(driver="bind", source="{root}/img/busybox",
                                      mount_point="{root}/../escape"), []),
    ("storages[0].mount_point", pb.Storage(mount_point="{root}/img/busybox"),
     [pb.Storage(driver="ephemeral", mount_point="/mnt")]),
    ("storages[0].driver", pb.Storage(mount_point="{root}/img/busybox"),
     [pb.Storage(driver="nfs", mount_point="{root}/x")]),
])
def test_paths_outside_root_rejected(agent: AgentProcess, field: str, rootfs: pb.Storage,
                                     storages: list[pb.Storage]) -> None:
    rootfs, *storages = [_rooted(s, agent) for s in [rootfs, *storages]]
    with pytest.raises(grpc.RpcError) as e:
        _create(agent, "badpath", rootfs, storages)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    assert not (agent.root / "containers" / "badpath").exists()
    assert not os.path.ismount(agent.root / "r")


def test_symlink_escape_rejected(agent: AgentProcess) -> None:
    link = agent.root / "shared" / "evil"
    os.symlink("/etc", link)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _create(agent, "symlinked", pb.Storage(mount_point=str(link)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        os.unlink(link)


def test_bad_spec_json_rejected(agent: AgentProcess) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _create(agent, "badjson", pb.Storage(mount_point=str(agent.root / "img" / "busybox")),
                spec=b"{not json")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "oci_spec_json" in e.value.details()


@pytest.mark.parametrize("call,request_", [
    ("StartContainer", pb.ContainerRequest(container_id="ghost")),
    ("WaitProcess", pb.ProcessRequest(container_id="ghost")),
    ("SignalProcess", pb.SignalProcessRequest(container_id="ghost", signal=9)),
    ("StatsContainer", pb.ContainerRequest(container_id="ghost")),
    ("RemoveContainer", pb.RemoveContainerRequest(container_id="ghost")),
])
def test_unknown_container_not_found(agent: AgentProcess, call: str, request_) -> None:
    code, msg = _code(getattr(agent.stub, call), request_)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "ghost" in msg


def test_unknown_exec_not_found(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("hasexec", ["sleep", "1000"])
    code, msg = _code(agent.stub.WaitProcess, pb.ProcessRequest(container_id=cid, exec_id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg


def test_health_version_details(agent: AgentProcess) -> None:
    assert agent.stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING
    v = agent.stub.Version(pb.google_dot_protobuf_dot_empty__pb2.Empty(), timeout=RPC_TIMEOUT)
    assert v.agent_version and v.grpc_version
    d = agent.stub.GetGuestDetails(pb.GuestDetailsRequest(mem_block_size=True), timeout=RPC_TIMEOUT)
    assert d.agent_details.oci_runtime == agent.runtime
    assert d.online_cpus >= 1 and d.mem_total_bytes > 0 and d.kernel_release == os.uname().release
    assert "9p" in d.agent_details.storage_handlers


def test_update_interface_for_an_unknown_nic_is_a_clear_error(agent: AgentProcess) -> None:
    # the guest is untrusting in both directions: a MAC that matches no NIC must not be guessed at
    code, message = _code(agent.stub.UpdateInterface, pb.UpdateInterfaceRequest(
        interface=pb.Interface(hw_addr="not-a-mac", name="eth9")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)


def test_sandbox_twice_already_exists(agent: AgentProcess) -> None:
    code, _ = _code(agent.stub.CreateSandbox, pb.CreateSandboxRequest())
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_sigterm_kills_containers_and_leaves_nothing(agent_runtime_problems, tmp_path_factory) -> None:
    """A separate agent: SIGTERM with a running container must remove it and exit 0."""
    from .conftest import AgentProcess as Proc
    from .conftest import agent_build_rootfs

    if agent_runtime_problems["runc"]:
        pytest.skip(agent_runtime_problems["runc"])
    tmp = tmp_path_factory.mktemp("agent-sigterm")
    a = Proc(tmp, "runc")
    try:
        agent_build_rootfs(a.root / "img")
        a.stub.CreateContainer(pb.CreateContainerRequest(
            container_id="long", oci_spec_json=json.dumps(agent_oci_spec(["sleep", "1000"])).encode(),
            rootfs=pb.Storage(mount_point=str(a.root / "img"))), timeout=RPC_TIMEOUT)
        a.stub.StartContainer(pb.ContainerRequest(container_id="long"), timeout=RPC_TIMEOUT)
        pid = a.stub.ListProcesses(pb.ContainerRequest(container_id="long"), timeout=RPC_TIMEOUT).pids[0]
        assert a.stop() == 0
        assert a.runtime_list() == []
        assert not os.path.exists(f"/proc/{pid}")
        assert not (a.root / "containers" / "long").exists()
        assert not (tmp / "a.sock").exists()
    finally:
        a.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_reseed_and_time_input(agent: AgentProcess) -> None:
    agent.stub.ReseedRandomDev(pb.ReseedRandomDevRequest(data=os.urandom(64)), timeout=RPC_TIMEOUT)
    code, msg = _code(agent.stub.ReseedRandomDev, pb.ReseedRandomDevRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # Only invalid times: a valid one would set this host's clock.
    code, msg = _code(agent.stub.SetGuestDateTime, pb.SetGuestDateTimeRequest(sec=1, usec=2_000_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "usec" in msg
