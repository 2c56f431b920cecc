"""The agent against the real runc/crun: container lifecycle, stdio, exec, signals, errors."""

import json
import os

import grpc
import pytest

from protos.agent.v1 import agent_pb2 as pb

from .conftest import RPC_TIMEOUT, AgentProcess


def _read(stream_rpc, cid: str, exec_id: str = "") -> bytes:
    return b"".join(c.data for c in stream_rpc(pb.ProcessRequest(container_id=cid, exec_id=exec_id),
                                               timeout=RPC_TIMEOUT))


def _wait(agent: AgentProcess, cid: str, exec_id: str = "") -> int:
    return agent.stub.WaitProcess(pb.ProcessRequest(container_id=cid, exec_id=exec_id),
                                  timeout=RPC_TIMEOUT).status


def test_run_to_exit_delivers_output_and_status(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("hello", ["sh", "-c", "echo hello; echo err >&2; exit 3"])
    assert _read(agent.stub.ReadStdout, cid) == b"hello\n"
    assert _read(agent.stub.ReadStderr, cid) == b"err\n"
    assert _wait(agent, cid) == 3
    assert _wait(agent, cid) == 3  # waiting again gives the same answer
    # The host's hooks were dropped (the prestart hook path does not exist: runc would have failed),
    # the host cgroupsPath and namespace path were replaced.
    config = json.loads((agent.root / "containers" / cid / "config.json").read_text())
    assert "hooks" not in config
    assert config["linux"]["cgroupsPath"] == f"/kata-py/{cid}"
    assert all(ns["type"] != "network" for ns in config["linux"]["namespaces"])
    assert config["root"]["path"] == str(agent.root / "containers-rootfs" / cid)


def test_output_written_before_exit_is_not_lost(agent: AgentProcess, agent_containers) -> None:
    # Read only after the process has exited: the pipe holds the output, then EOF ends the stream.
    cid = agent_containers("late", ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done"])
    assert _wait(agent, cid) == 0
    out = _read(agent.stub.ReadStdout, cid).decode().splitlines()
    assert out == [f"line{i}" for i in range(2000)]


def test_exec_in_running_container(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("sleeper", ["sleep", "1000"])
    proc = {"args": ["sh", "-c", "echo from-exec; exit 7"], "env": ["PATH=/bin"], "cwd": "/",
            "user": {"uid": 0, "gid": 0}}
    r = agent.stub.ExecProcess(pb.ExecProcessRequest(container_id=cid, exec_id="e1",
                                                     process_json=json.dumps(proc).encode()),
                               timeout=RPC_TIMEOUT)
    assert r.pid > 0
    assert _read(agent.stub.ReadStdout, cid, "e1") == b"from-exec\n"
    assert _wait(agent, cid, "e1") == 7
    pids = agent.stub.ListProcesses(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT).pids
    assert len(pids) == 1  # only the sleep: the exec has exited
    with pytest.raises(grpc.RpcError) as e:  # a waited exec is forgotten
        _wait(agent, cid, "e1")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_stdin_round_trip(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("cat", ["cat"], stdin=True)
    n = agent.stub.WriteStdin(pb.WriteStdinRequest(container_id=cid, data=b"ping\n"), timeout=RPC_TIMEOUT)
    assert n.len == 5
    agent.stub.CloseStdin(pb.ProcessRequest(container_id=cid), timeout=RPC_TIMEOUT)
    assert _read(agent.stub.ReadStdout, cid) == b"ping\n"
    assert _wait(agent, cid) == 0


def test_signal_gives_128_plus_signal(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("victim", ["sleep", "1000"])
    # sleep as a pid-namespace init ignores SIGTERM unless it installs a handler: use all=true,
    # which the runtime delivers to every process, then SIGKILL via a plain signal.
    agent.stub.SignalProcess(pb.SignalProcessRequest(container_id=cid, signal=9), timeout=RPC_TIMEOUT)
    assert _wait(agent, cid) == 128 + 9
    with pytest.raises(grpc.RpcError) as e:
        agent.stub.SignalProcess(pb.SignalProcessRequest(container_id=cid, signal=15), timeout=RPC_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "already finished" in e.value.details()


def test_sigterm_to_shell_with_trap(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("trapper", ["sh", "-c", "trap 'exit 143' TERM; echo ready; while :; do sleep 0.05; done"])
    stream = agent.stub.ReadStdout(pb.ProcessRequest(container_id=cid), timeout=RPC_TIMEOUT)
    assert next(stream).data == b"ready\n"
    agent.stub.SignalProcess(pb.SignalProcessRequest(container_id=cid, signal=15, all=True),
                             timeout=RPC_TIMEOUT)
    assert _wait(agent, cid) == 128 + 15
    stream.cancel()


def test_terminal_mode_gives_output(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("tty", ["sh", "-c", "stty size; echo on-tty"], terminal=True, start=False)
    agent.stub.TtyWinResize(pb.TtyWinResizeRequest(container_id=cid, row=33, column=77), timeout=RPC_TIMEOUT)
    agent.stub.StartContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    out = _read(agent.stub.ReadStdout, cid)
    assert b"33 77" in out and b"on-tty" in out
    assert _read(agent.stub.ReadStderr, cid) == b""  # a pty merges both streams onto stdout
    assert _wait(agent, cid) == 0


def test_remove_cleans_bundle_and_runtime_state(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("doomed", ["sleep", "1000"])
    assert cid in agent.runtime_list()
    agent.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=cid, timeout_seconds=10),
                               timeout=RPC_TIMEOUT)
    assert cid not in agent.runtime_list()
    assert not (agent.root / "containers" / cid).exists()
    assert not os.path.ismount(agent.root / "containers-rootfs" / cid)
    with pytest.raises(grpc.RpcError) as e:
        agent.stub.StartContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_state_machine_errors(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("states", ["sleep", "1000"], start=False)
    with pytest.raises(grpc.RpcError) as e:
        agent.stub.PauseContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "created state" in e.value.details() and cid in e.value.details()
    agent.stub.StartContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError) as e:
        agent.stub.StartContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    agent.stub.PauseContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    agent.stub.ResumeContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError) as e:
        agent_containers("states", ["true"])
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_stats_from_cgroup2(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("busy", ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000"])
    stats = agent.stub.StatsContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    assert stats.cpu.total_usage_ns > 0


def test_terminal_output_survives_exit(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("ttylate", ["sh", "-c", "echo before-exit"], terminal=True)
    assert _wait(agent, cid) == 0
    assert b"before-exit" in _read(agent.stub.ReadStdout, cid)


def test_exec_with_terminal_and_stdin(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers("execio", ["sleep", "1000"])
    cat = {"args": ["cat"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    agent.stub.ExecProcess(pb.ExecProcessRequest(container_id=cid, exec_id="cat", stdin=True,
                                                 process_json=json.dumps(cat).encode()), timeout=RPC_TIMEOUT)
    stream = agent.stub.ReadStdout(pb.ProcessRequest(container_id=cid, exec_id="cat"), timeout=RPC_TIMEOUT)
    agent.stub.WriteStdin(pb.WriteStdinRequest(container_id=cid, exec_id="cat", data=b"exec-in\n"),
                          timeout=RPC_TIMEOUT)
    agent.stub.CloseStdin(pb.ProcessRequest(container_id=cid, exec_id="cat"), timeout=RPC_TIMEOUT)
    assert b"".join(c.data for c in stream) == b"exec-in\n"
    assert _wait(agent, cid, "cat") == 0

    tty = {"args": ["sh", "-c", "read line; echo got-$line"], "env": ["PATH=/bin"], "cwd": "/",
           "user": {"uid": 0, "gid": 0}}
    agent.stub.ExecProcess(pb.ExecProcessRequest(container_id=cid, exec_id="tty", terminal=True, stdin=True,
                                                 process_json=json.dumps(tty).encode()), timeout=RPC_TIMEOUT)
    agent.stub.WriteStdin(pb.WriteStdinRequest(container_id=cid, exec_id="tty", data=b"abc\r"),
                          timeout=RPC_TIMEOUT)
    assert b"got-abc" in _read(agent.stub.ReadStdout, cid, "tty")
    assert _wait(agent, cid, "tty") == 0


def test_pod_containers_join_the_sandbox_containers_namespaces(agent: AgentProcess, agent_containers) -> None:
    """CRI gives a pod's containers the pause container's ipc/uts(/pid) namespaces as host paths;
    in the guest they join the sandbox container's (shareProcessNamespace included)."""
    from .conftest import agent_oci_spec

    pause = agent_containers("pause1", ["sleep", "1000"])
    spec = agent_oci_spec([])
    spec["annotations"] = {"io.kubernetes.cri.container-type": "container",
                           "io.kubernetes.cri.sandbox-id": pause}
    spec["linux"]["namespaces"] = [{"type": t, "path": f"/proc/4242/ns/{t}"} for t in ("pid", "ipc", "uts")] \
        + [{"type": "mount"}]

    def run_in_pod(cid: str, script: str) -> bytes:
        """Create and start `cid` running `script` in the pod; return its whole stdout (read to EOF)."""
        spec["process"]["args"] = ["sh", "-c", script]
        agent.stub.CreateContainer(pb.CreateContainerRequest(
            container_id=cid, oci_spec_json=json.dumps(spec).encode(),
            rootfs=pb.Storage(driver="bind", source=str(agent.root / "img" / "busybox"),
                              mount_point=str(agent.root / "containers-rootfs" / cid))), timeout=RPC_TIMEOUT)
        try:
            agent.stub.StartContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
            out = _read(agent.stub.ReadStdout, cid)
            assert _wait(agent, cid) == 0
            return out
        finally:
            agent.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=cid, timeout_seconds=10),
                                       timeout=RPC_TIMEOUT)

    out = run_in_pod("app1", "busybox readlink /proc/self/ns/ipc; busybox readlink /proc/self/ns/uts; "
                             "ps -o comm | busybox grep -c sleep").decode().split()
    pause_pid = agent.stub.ListProcesses(pb.ContainerRequest(container_id=pause), timeout=RPC_TIMEOUT).pids[0]
    assert out[:2] == [os.readlink(f"/proc/{pause_pid}/ns/ipc"), os.readlink(f"/proc/{pause_pid}/ns/uts")]
    assert out[2] == "1", "the pause container's sleep is not visible: pid namespace not shared"

    # in the pod's pid namespace, the end of a container's init does not end its other processes by
    # itself: the agent kills them (as the runc shim does), else they would hold its output open
    assert run_in_pod("app2", "sleep 1000 & echo bye") == b"bye\n"  # EOF: the background sleep is gone
    pids = agent.stub.ListProcesses(pb.ContainerRequest(container_id=pause), timeout=RPC_TIMEOUT).pids
    assert len(pids) == 1, "only the pause container's own process is left"
