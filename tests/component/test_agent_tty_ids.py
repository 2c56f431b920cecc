"""Terminals with CRI's ids (64 hex characters for the container and for each exec) against the real
runc/crun: the console socket must fit AF_UNIX's 107 bytes whatever the ids (critest's 'exec with
tty=true and stdin=true' failed with 'AF_UNIX path too long'), and TtyWinResize reaches the pty."""

import hashlib
import json

from protos.agent.v1 import agent_pb2 as pb

from .conftest import RPC_TIMEOUT, AgentProcess


def _cri_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()  # the shape of containerd's GenerateID


def _exec(agent: AgentProcess, cid: str, exec_id: str, args: list[str]) -> None:
    process = {"args": args, "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/", "user": {"uid": 0, "gid": 0},
               "terminal": True}
    agent.stub.ExecProcess(pb.ExecProcessRequest(container_id=cid, exec_id=exec_id, terminal=True, stdin=True,
                                                 process_json=json.dumps(process).encode()), timeout=RPC_TIMEOUT)


def _output(agent: AgentProcess, cid: str, exec_id: str = "") -> bytes:
    req = pb.ProcessRequest(container_id=cid, exec_id=exec_id)
    out = b"".join(c.data for c in agent.stub.ReadStdout(req, timeout=RPC_TIMEOUT))
    assert agent.stub.WaitProcess(req, timeout=RPC_TIMEOUT).status == 0
    return out


def test_tty_exec_with_cri_length_ids(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers(_cri_id("container"), ["sleep", "1000"])
    assert len(str(agent.root / "containers" / cid / f"exec-{_cri_id('exec')}.sock")) > 107  # the old path
    exec_id = _cri_id("exec")
    _exec(agent, cid, exec_id, ["echo", "hello"])
    assert b"hello" in _output(agent, cid, exec_id)


def test_tty_win_resize_reaches_init_and_exec(agent: AgentProcess, agent_containers) -> None:
    cid = agent_containers(_cri_id("resized"), ["sh", "-c", "read go; stty size"], terminal=True, stdin=True)
    exec_id = _cri_id("resized-exec")
    _exec(agent, cid, exec_id, ["sh", "-c", "read go; stty size"])
    # the exec first: the init's exit ends every process of the container
    for eid, (rows, cols), expected in ((exec_id, (30, 77), b"30 77"), ("", (45, 123), b"45 123")):
        agent.stub.TtyWinResize(pb.TtyWinResizeRequest(container_id=cid, exec_id=eid, row=rows, column=cols),
                                timeout=RPC_TIMEOUT)
        agent.stub.WriteStdin(pb.WriteStdinRequest(container_id=cid, exec_id=eid, data=b"go\r"),
                              timeout=RPC_TIMEOUT)
        assert expected in _output(agent, cid, eid)
