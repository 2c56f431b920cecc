"""ResizePty over real ttrpc with the FakeAgent: an exec's terminal gets the size
(containerd sends width/height, the agent takes rows/columns), a process without one is refused.
tests/e2e/test_cri_streams.py checks the same through containerd's streaming server into a VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import any_pb2

import ttrpc
from protos.containerd.runtime.v2.task import shim_pb2 as pb
from tests.component.test_service import bundle, running_shim  # noqa: F401  (fixture)


async def test_resize_pty_of_init_and_exec(bundle: Path):  # noqa: F811
    async with running_shim() as shim:
        agent = shim.sandbox.agent
        agent.script("c1", exit_code=None)
        agent.script("c1", "tty", exit_code=None)
        agent.script("c1", "plain", exit_code=None)
        await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), pb.CreateTaskResponse)
        await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
        spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                           value=json.dumps({"args": ["sh"], "cwd": "/", "terminal": True}).encode())
        for exec_id, terminal in (("tty", True), ("plain", False)):
            await shim.call("Exec", pb.ExecProcessRequest(id="c1", exec_id=exec_id, spec=spec, terminal=terminal))
            await shim.call("Start", pb.StartRequest(id="c1", exec_id=exec_id), pb.StartResponse)

        await shim.call("ResizePty", pb.ResizePtyRequest(id="c1", exec_id="tty", width=123, height=45))
        processes = agent.containers["c1"].processes
        assert processes["tty"].winsize == (45, 123)  # (rows, columns)

        for exec_id in ("plain", ""):  # the FakeSandbox creates the init without a terminal
            with pytest.raises(ttrpc.StatusError) as info:
                await shim.call("ResizePty", pb.ResizePtyRequest(id="c1", exec_id=exec_id, width=1, height=1))
            assert info.value.code == ttrpc.Code.FAILED_PRECONDITION
            assert "has no terminal" in str(info.value)
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("ResizePty", pb.ResizePtyRequest(id="c1", exec_id="nope", width=1, height=1))
        assert info.value.code == ttrpc.Code.NOT_FOUND
        assert processes["plain"].winsize is None
