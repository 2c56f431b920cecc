"""The Task service over real ttrpc, with a fake sandbox and FakeAgent: codes, events, lifecycle rules.

Fast (no VM): this pins the contract containerd relies on (protocols.md §3-§4); the end-to-end tests
check the same service against real containerd and QEMU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from google.protobuf import any_pb2, empty_pb2

import ttrpc
from agent_client.fake import FakeAgent
from agent_client.protocol import Storage
from protos.containerd.api.types.task import task_pb2 as task_types
from protos.containerd.runtime.v2.task import shim_pb2 as pb
from shim.events import Publisher
from shim.process import Container
from shim.sandbox import agent_errors
from shim.service import TASK_SERVICE, TaskService

SPEC = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "cwd": "/", "env": []}, "root": {"path": "rootfs"}}


class FakeSandbox:
    """Stands in for VmSandbox: no VM, the FakeAgent answers."""

    def __init__(self) -> None:
        self.agent = FakeAgent()
        self.resized = 0
        self.started = False
        self.removed: list[tuple[str, bool]] = []

    def pid(self) -> int:
        return 4242

    async def create_container(self, container: Container) -> None:
        async with agent_errors():
            if not self.started:
                await self.agent.create_sandbox("h", (), (), "sbx", "machine")
                self.started = True
            container.init.guest_pid = await self.agent.create_container(
                container.id, container.spec, Storage(driver="", source="", mount_point="/r"))

    async def remove_container(self, container: Container, *, sandbox_ending: bool = False) -> None:
        self.removed.append((container.id, sandbox_ending))
        if not sandbox_ending:
            await self.agent.remove_container(container.id, 5)

    async def resources_changed(self, containers: Iterable[Container], *, wait: bool = False) -> None:
        self.resized += 1

    async def stop(self) -> None:
        pass


class Shim:
    def __init__(self, client: ttrpc.Client, sandbox: FakeSandbox, publisher: Publisher,
                 shutdown: trio.Event) -> None:
        self.client, self.sandbox, self.publisher, self.shutdown = client, sandbox, publisher, shutdown

    async def call(self, method: str, request, reply=empty_pb2.Empty):
        return await self.client.call(TASK_SERVICE, method, request, reply, timeout=5)

    def topics(self) -> list[str]:
        return [e.topic for e in self.publisher.published]


@asynccontextmanager
async def running_shim() -> AsyncIterator[Shim]:
    sandbox, publisher, shutdown = FakeSandbox(), Publisher("test"), trio.Event()
    server = ttrpc.Server(require_same_user=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        service = TaskService(sandbox, publisher, nursery, shutdown)  # type: ignore[arg-type]
        server.register(TASK_SERVICE, service.methods())
        left, right = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, right)
        async with ttrpc.open_client_on_stream(left) as client:
            yield Shim(client, sandbox, publisher, shutdown)
        nursery.cancel_scope.cancel()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(SPEC))
    return tmp_path


async def settle() -> None:
    for _ in range(20):
        await trio.lowlevel.checkpoint()


async def test_lifecycle_events_and_exit_status(bundle: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="shim.timing")
    async with running_shim() as shim:
        shim.sandbox.agent.script("c1", stdout=[b"hi\n"], exit_code=3)
        created = await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), pb.CreateTaskResponse)
        assert created.pid == 4242  # the hypervisor's pid, as Kata reports
        state = await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
        assert state.status == task_types.CREATED
        await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
        waited = await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
        assert waited.exit_status == 3
        assert (await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)).status == task_types.STOPPED
        deleted = await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
        assert deleted.exit_status == 3
        await settle()
        # ordering contract: create → start → exit → delete
        assert shim.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        # a lone container owns the VM: Shutdown follows, so its guest removal is skipped
        assert shim.sandbox.removed == [("c1", True)]
        # one telemetry line per task, at Delete: every moment of this one happened
        [line] = [m for m in caplog.messages if m.startswith("timing lifecycle=c1 ")]
        for phase in ("create", "to_start", "start", "first_output", "run", "to_delete", "delete"):
            assert f" {phase}=" in line, line


async def test_only_the_pods_last_container_skips_the_guest_removal(tmp_path: Path):
    def pod_bundle(name: str, kind: str) -> Path:
        spec = {**SPEC, "annotations": {"io.kubernetes.cri.container-type": kind,
                                        "io.kubernetes.cri.sandbox-id": "pod"},
                "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "ipc"}]}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(spec))
        return tmp_path / name

    async with running_shim() as shim:
        for cid, kind in (("pod", "sandbox"), ("app", "container")):
            shim.sandbox.agent.script(cid, exit_code=0)
            await shim.call("Create", pb.CreateTaskRequest(id=cid, bundle=str(pod_bundle(cid, kind))),
                            pb.CreateTaskResponse)
        # the sandbox container first (a client may): the app still runs in the VM, remove it for real
        await shim.call("Delete", pb.DeleteRequest(id="pod"), pb.DeleteResponse)
        await shim.call("Delete", pb.DeleteRequest(id="app"), pb.DeleteResponse)
        assert shim.sandbox.removed == [("pod", False), ("app", False)]


async def test_error_codes_containerd_expects(bundle: Path):
    async with running_shim() as shim:
        shim.sandbox.agent.script("c1", exit_code=None)
        for method, request in [("State", pb.StateRequest(id="nope")), ("Kill", pb.KillRequest(id="nope")),
                                ("Delete", pb.DeleteRequest(id="nope"))]:
            with pytest.raises(ttrpc.StatusError) as info:
                await shim.call(method, request)
            assert info.value.code == ttrpc.Code.NOT_FOUND, method
        await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), pb.CreateTaskResponse)
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), pb.CreateTaskResponse)
        assert info.value.code == ttrpc.Code.ALREADY_EXISTS
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Pause", pb.PauseRequest(id="c1"))
        assert info.value.code == ttrpc.Code.FAILED_PRECONDITION
        assert "cannot pause task in created state" in str(info.value)
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Checkpoint", pb.CheckpointTaskRequest(id="c1"))
        assert info.value.code == ttrpc.Code.UNIMPLEMENTED
        bad = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                          value=b'{"cpu": {"quota": "lots"}}')
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Update", pb.UpdateTaskRequest(id="c1", resources=bad))
        assert info.value.code == ttrpc.Code.INVALID_ARGUMENT and "quota" in str(info.value)
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Create", pb.CreateTaskRequest(id="../x", bundle=str(bundle)), pb.CreateTaskResponse)
        assert info.value.code == ttrpc.Code.INVALID_ARGUMENT


async def test_bad_spec_is_refused_naming_the_field(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({**SPEC, "process": {"args": [], "cwd": "/"}}))
    async with running_shim() as shim:
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(tmp_path)), pb.CreateTaskResponse)
        assert info.value.code == ttrpc.Code.INVALID_ARGUMENT
        assert "process.args" in str(info.value)


async def test_kill_before_start_stops_the_task_and_releases_wait(bundle: Path):
    async with running_shim() as shim:
        shim.sandbox.agent.script("c1", exit_code=None)
        await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), pb.CreateTaskResponse)
        async with trio.open_nursery() as nursery:
            waited: list[int] = []

            async def wait() -> None:
                waited.append((await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)).exit_status)

            nursery.start_soon(wait)
            await settle()
            await shim.call("Kill", pb.KillRequest(id="c1", signal=9))
        assert waited == [137]
        with pytest.raises(ttrpc.StatusError) as info:  # already finished: containerd tolerates NotFound
            await shim.call("Kill", pb.KillRequest(id="c1", signal=9))
        assert info.value.code == ttrpc.Code.NOT_FOUND
        await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_exec_and_shutdown_only_when_empty(bundle: Path):
    async with running_shim() as shim:
        agent = shim.sandbox.agent
        agent.script("c1", exit_code=None)
        agent.script("c1", "e1", stdout=[b"x"], exit_code=0)
        await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), pb.CreateTaskResponse)
        await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
        spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                           value=json.dumps({"args": ["true"], "cwd": "/"}).encode())
        await shim.call("Exec", pb.ExecProcessRequest(id="c1", exec_id="e1", spec=spec))
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Exec", pb.ExecProcessRequest(id="c1", exec_id="e1", spec=spec))
        assert info.value.code == ttrpc.Code.ALREADY_EXISTS
        await shim.call("Start", pb.StartRequest(id="c1", exec_id="e1"), pb.StartResponse)
        assert (await shim.call("Wait", pb.WaitRequest(id="c1", exec_id="e1"), pb.WaitResponse)).exit_status == 0
        await shim.call("Delete", pb.DeleteRequest(id="c1", exec_id="e1"), pb.DeleteResponse)
        await shim.call("Shutdown", pb.ShutdownRequest(id="c1"))
        assert not shim.shutdown.is_set()  # a container remains: the pod shim lives on
        await shim.call("Kill", pb.KillRequest(id="c1", signal=15))
        await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
        await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
        await shim.call("Shutdown", pb.ShutdownRequest(id="c1"))
        assert shim.shutdown.is_set()
        await settle()
        topics = shim.topics()
        assert topics.index("/tasks/exec-added") < topics.index("/tasks/exec-started")


async def test_guest_oom_kills_become_task_oom_events(bundle: Path):
    """kubelet's OOMKilled comes from TaskOOM: each kill the agent reports for a container we hold is
    published; an id the shim does not hold (hostile or stale) is dropped."""
    async with running_shim() as shim:
        shim.sandbox.agent.script("c1", exit_code=None)
        await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), pb.CreateTaskResponse)
        shim.sandbox.agent.emit_oom("c1")
        shim.sandbox.agent.emit_oom("not-ours")
        shim.sandbox.agent.emit_oom("c1")
        await settle()
        ooms = [e for e in shim.publisher.published if e.topic == "/tasks/oom"]
        assert [e.event.container_id for e in ooms] == ["c1", "c1"], shim.topics()
        assert shim.topics() == ["/tasks/create", "/tasks/oom", "/tasks/oom"]


async def test_a_refusal_is_in_the_shims_log_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """containerd may wrap or cut the error it shows: the shim's own log (containerd's log) says it."""
    spec = {**SPEC, "annotations": {"io.kubernetes.cri.container-type": "sandbox"}, "linux": {"namespaces": []}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    caplog.set_level(logging.DEBUG, logger="shim.service")
    async with running_shim() as shim:
        with pytest.raises(ttrpc.StatusError) as info:
            await shim.call("Create", pb.CreateTaskRequest(id="pod", bundle=str(tmp_path)), pb.CreateTaskResponse)
        assert info.value.code == ttrpc.Code.INVALID_ARGUMENT
        with pytest.raises(ttrpc.StatusError):
            await shim.call("Kill", pb.KillRequest(id="gone"))
    [refusal] = [r for r in caplog.records if "Create pod refused" in r.getMessage()]
    assert refusal.levelno == logging.WARNING and "hostNetwork: true" in refusal.getMessage()
    [routine] = [r for r in caplog.records if "Kill gone refused" in r.getMessage()]
    assert routine.levelno == logging.DEBUG
