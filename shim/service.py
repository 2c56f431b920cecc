"""containerd.task.v2.Task over ttrpc: each RPC is a short adapter.

Look the container up (NotFound if unknown) → delegate to the sandbox/agent → queue an event. Errors
are ShimErrors (or agent errors mapped once in `_agent_errors`); the ttrpc boundary turns them into
status codes. Protobuf types stop here: the sandbox and agent client see our own types.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

import ttrpc
from protos.cgroups.v2.stats import metrics_pb2 as metrics_v2
from protos.containerd.api.events import task_pb2 as ev
from protos.containerd.api.types.task import task_pb2 as task_types
from protos.containerd.runtime.v2.task import shim_pb2 as pb

from . import oci
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ShimError, Unimplemented
from .events import Publisher, pack_any, timestamp
from .process import LOST_EXIT_STATUS, Container, Process, State
from .resources.sizing import ContainerResources, merge_update
from .sandbox import Sandbox, agent_errors
from .stdio import HostStdio, pump_output, pump_stdin
from .timing import LifecycleTimer

log = logging.getLogger(__name__)

TASK_SERVICE = "containerd.task.v2.Task"
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
SHUTDOWN_WAIT_S = 2.5

_STATUS = {
    State.CREATED: task_types.CREATED, State.RUNNING: task_types.RUNNING, State.PAUSED: task_types.PAUSED,
    State.STOPPED: task_types.STOPPED, State.DELETED: task_types.STOPPED,
}


def _json_any(value: any_pb2.Any, expected_url: str, what: str) -> Any:
    if value.type_url != expected_url:
        raise InvalidArgument(f"{what}: unsupported type {value.type_url!r}")
    try:
        return json.loads(value.value)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: malformed JSON: {exc}") from None


class TaskService:
    """The Task API of one shim. Owns the container table; `nursery` runs the process watchers."""

    def __init__(self, sandbox: Sandbox, publisher: Publisher, nursery: trio.Nursery,
                 shutdown: trio.Event, stopped: trio.Event | None = None) -> None:
        self.sandbox = sandbox
        self.publisher = publisher
        self._nursery = nursery
        self._shutdown = shutdown  # set by Shutdown: the daemon stops the sandbox...
        self._stopped = stopped  # ...and sets this once the VM is gone
        self.containers: dict[str, Container] = {}  # guarded by _table_lock for create/delete
        self._table_lock = trio.Lock()
        self._watching_ooms = False

    # --- helpers -------------------------------------------------------------------------------
    def _container(self, cid: str) -> Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise NotFound(f"container {cid}") from None

    def _process(self, cid: str, exec_id: str) -> Process:
        return self._container(cid).process(exec_id)

    @asynccontextmanager
    async def _agent(self) -> AsyncIterator[Any]:
        async with agent_errors():
            yield self.sandbox.agent

    def methods(self) -> dict[str, ttrpc.Method[Any]]:
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "State": (pb.StateRequest, self.state), "Create": (pb.CreateTaskRequest, self.create),
            "Start": (pb.StartRequest, self.start), "Delete": (pb.DeleteRequest, self.delete),
            "Pids": (pb.PidsRequest, self.pids), "Pause": (pb.PauseRequest, self.pause),
            "Resume": (pb.ResumeRequest, self.resume), "Checkpoint": (pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (pb.KillRequest, self.kill), "Exec": (pb.ExecProcessRequest, self.exec),
            "ResizePty": (pb.ResizePtyRequest, self.resize_pty), "CloseIO": (pb.CloseIORequest, self.close_io),
            "Update": (pb.UpdateTaskRequest, self.update), "Wait": (pb.WaitRequest, self.wait),
            "Stats": (pb.StatsRequest, self.stats), "Connect": (pb.ConnectRequest, self.connect),
            "Shutdown": (pb.ShutdownRequest, self.shutdown),
        }

        def adapt(fn: Callable[[Any], Awaitable[Message]]) -> Callable[[ttrpc.RequestContext, Any],
                                                                       Awaitable[Message]]:
            async def handler(ctx: ttrpc.RequestContext, request: Any) -> Message:
                log.debug("%s %s", ctx.method, getattr(request, "id", ""))
                try:
                    return await fn(request)
                except ShimError as exc:
                    # what containerd shows its user may be wrapped or cut: the shim's log says it whole
                    # (NotFound is routine: containerd kills and deletes what may be gone already)
                    log.log(logging.DEBUG if isinstance(exc, NotFound) else logging.WARNING,
                            "%s %s refused: %s", ctx.method, getattr(request, "id", ""), exc)
                    raise
            return handler

        return {name: ttrpc.Method(req, adapt(fn)) for name, (req, fn) in table.items()}

    # --- lifecycle -----------------------------------------------------------------------------
    async def create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        timer = LifecycleTimer()
        cid = oci.validate_id(req.id, "container id")
        if req.checkpoint or req.parent_checkpoint:
            raise Unimplemented("checkpoint/restore is not supported by kata-py")
        async with self._table_lock:
            if cid in self.containers:
                raise AlreadyExists(f"container {cid}")
            spec = oci.load_spec(req.bundle)
            role = oci.pod_role(cid, spec.get("annotations", {}))
            oci.refuse_host_namespaces(spec)
            terminal = bool(req.terminal)
            stdio = await HostStdio.open(req.stdin, req.stdout, req.stderr, terminal, process_id=cid,
                                         namespace=self.publisher.namespace)
            init = Process(cid, "", stdio, terminal, stdio_paths=(req.stdin, req.stdout, req.stderr), timer=timer)
            try:
                resources = ContainerResources.from_oci((spec.get("linux") or {}).get("resources"))
            except ValueError as exc:
                raise InvalidArgument(f"OCI spec field linux.resources: {exc}") from None
            container = Container(cid, req.bundle, spec, role.is_sandbox, init, resources, list(req.rootfs))
            try:
                await self.sandbox.create_container(container)
            except BaseException:
                stdio.close()
                raise
            self.containers[cid] = container
        init.pid = self.sandbox.pid()
        timer.mark("created")
        if not self._watching_ooms:  # the sandbox's agent is up from the first create on
            self._watching_ooms = True
            self._nursery.start_soon(self._publish_ooms)
        self._nursery.start_soon(self._watch, container, init)
        self.publisher.publish(ev.TaskCreate(
            container_id=cid, bundle=req.bundle, rootfs=req.rootfs, pid=init.pid,
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=terminal)))
        return pb.CreateTaskResponse(pid=init.pid)

    async def start(self, req: pb.StartRequest) -> pb.StartResponse:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        proc.timer.mark("start_called")
        async with proc.start_lock:
            proc.require("start", State.CREATED)
            if proc.exec_id:
                container.init.require("exec in", State.RUNNING)
                async with self._agent() as agent:
                    proc.guest_pid = await agent.exec_process(
                        container.id, proc.exec_id, proc.spec, terminal=proc.terminal,
                        stdin=proc.stdio.has_stdin)
                proc.pid = self.sandbox.pid()
                self._nursery.start_soon(self._watch, container, proc)
                proc.move(State.RUNNING)
                self.publisher.publish(ev.TaskExecStarted(container_id=container.id, exec_id=proc.exec_id,
                                                          pid=proc.pid))
            else:
                async with self._agent() as agent:
                    await agent.start_container(container.id)
                proc.move(State.RUNNING)  # its resources are in the VM since create
                self.publisher.publish(ev.TaskStart(container_id=container.id, pid=proc.pid))
            proc.timer.mark("started")
        return pb.StartResponse(pid=proc.pid)

    async def _watch(self, container: Container, proc: Process) -> None:
        """Pump a process's stdio, then record its exit: output first, so none of it is lost.

        Like Kata's shim, WaitProcess is called only once stdout and stderr hit EOF (the agent may
        forget a waited exec, and with it any output not yet read).
        """
        agent = self.sandbox.agent
        status = LOST_EXIT_STATUS
        async with trio.open_nursery() as stdin_pump:
            if proc.stdio.has_stdin:
                stdin_pump.start_soon(self._pump_stdin, agent, container.id, proc)
            async with trio.open_nursery() as pumps:
                # stdout is drained even with nowhere to copy it: a full guest pipe blocks the process
                pumps.start_soon(self._pump_output, agent.read_stdout, container.id, proc, "stdout")
                if not proc.terminal:
                    pumps.start_soon(self._pump_output, agent.read_stderr, container.id, proc, "stderr")
            try:
                async with agent_errors():
                    status = await agent.wait_process(container.id, proc.exec_id)
            except Exception as exc:  # the VM or agent is gone: the process is lost
                log.warning("%s: wait failed: %s", proc.name, exc)
            # nobody reads stdin after exit; containerd may never send CloseIO (ctr doesn't when its
            # input ended before the task existed), so don't wait for it
            stdin_pump.cancel_scope.cancel()
        async with proc.start_lock:  # never publish an exit before the start event
            if proc.set_exited(status):
                proc.timer.mark("exited")
                self.publisher.publish(ev.TaskExit(
                    container_id=container.id, id=proc.exec_id or container.id, pid=proc.pid,
                    exit_status=status, exited_at=timestamp(proc.exited_at)))
        if not proc.exec_id:
            with trio.CancelScope(shield=True):
                await self.sandbox.resources_changed(self.containers.values())

    async def _publish_ooms(self) -> None:
        """TaskOOM for every OOM kill the guest reports (kubelet's `OOMKilled` comes from it), for
        the life of the agent's channel; ids of containers this shim does not hold are dropped."""
        try:
            async with agent_errors():
                async for cid in self.sandbox.agent.oom_events():
                    if cid in self.containers:
                        log.info("container %s: OOM kill in the guest", cid)
                        self.publisher.publish(ev.TaskOOM(container_id=cid))
        except Exception as exc:  # the VM or agent is gone: nothing more to report
            log.debug("OOM event stream ended: %s", exc)

    async def _pump_output(self, read: Callable[[str, str], Any], cid: str, proc: Process, which: str) -> None:
        try:
            async with agent_errors():
                await pump_output(read(cid, proc.exec_id), proc.stdio, which,
                                  on_chunk=lambda: proc.timer.mark("first_output"))
        except Exception as exc:  # a lost stream must not lose the exit status
            log.warning("%s: %s stream ended: %s", proc.name, which, exc)

    async def _pump_stdin(self, agent: Any, cid: str, proc: Process) -> None:
        async def write(data: bytes) -> int:
            async with agent_errors():
                return await agent.write_stdin(cid, proc.exec_id, data)

        async def close() -> None:
            async with agent_errors():
                await agent.close_stdin(cid, proc.exec_id)

        try:
            await pump_stdin(proc.stdio, write, close)
        except Exception as exc:
            log.warning("%s: stdin pump stopped: %s", proc.name, exc)

    async def delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        if proc.state in (State.RUNNING, State.PAUSED):
            raise FailedPrecondition(f"cannot delete a running {proc.name}")
        proc.timer.mark("delete_called")
        if proc.exec_id:
            del container.execs[proc.exec_id]
            proc.stdio.close()
        else:
            async with self._table_lock:
                if container.execs:
                    for exec_proc in container.execs.values():
                        exec_proc.stdio.close()
                if not proc.exited.is_set():  # created, never started: make it go away
                    with trio.move_on_after(10):
                        async with self._agent() as agent:
                            await agent.signal_process(container.id, "", signal.SIGKILL, all=True)
                        await proc.exited.wait()
                last = container.is_sandbox and list(self.containers) == [container.id]
                await self.sandbox.remove_container(container, sandbox_ending=last)
                proc.stdio.close()
                proc.move(State.DELETED)
                del self.containers[container.id]
                self.publisher.publish(ev.TaskDelete(
                    container_id=container.id, id=container.id, pid=proc.pid, exit_status=proc.exit_status,
                    exited_at=timestamp(proc.exited_at)))
        proc.timer.mark("deleted")
        proc.timer.log(f"{container.id}/{proc.exec_id}" if proc.exec_id else container.id)
        return pb.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status,
                                 exited_at=timestamp(proc.exited_at))

    async def exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        container = self._container(req.id)
        exec_id = oci.validate_id(req.exec_id, "exec id")
        spec = oci.validate_process(_json_any(req.spec, PROCESS_SPEC_URL, "exec spec"), "exec process")
        async with container.lock:
            if exec_id in container.execs:
                raise AlreadyExists(f"exec {exec_id} of container {container.id}")
            container.init.require("exec in", State.RUNNING)
            stdio = await HostStdio.open(req.stdin, req.stdout, req.stderr, bool(req.terminal),
                                         process_id=exec_id, namespace=self.publisher.namespace)
            container.execs[exec_id] = Process(container.id, exec_id, stdio, bool(req.terminal), spec=spec,
                                               stdio_paths=(req.stdin, req.stdout, req.stderr))
        self.publisher.publish(ev.TaskExecAdded(container_id=container.id, exec_id=exec_id))
        return empty_pb2.Empty()

    async def wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        proc = self._process(req.id, req.exec_id)
        await proc.exited.wait()
        return pb.WaitResponse(exit_status=proc.exit_status, exited_at=timestamp(proc.exited_at))

    async def kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        if proc.exited.is_set():
            raise NotFound(f"{proc.name}: process already finished")
        if proc.exec_id and proc.state is State.CREATED:  # exec never started: nothing in the guest yet
            proc.set_exited(128 + signal.SIGKILL)
            return empty_pb2.Empty()
        async with self._agent() as agent:
            await agent.signal_process(container.id, proc.exec_id, req.signal or signal.SIGTERM,
                                       all=bool(req.all))
        return empty_pb2.Empty()

    # --- queries -------------------------------------------------------------------------------
    async def state(self, req: pb.StateRequest) -> pb.StateResponse:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        stdin, stdout, stderr = proc.stdio_paths
        resp = pb.StateResponse(id=container.id, bundle=container.bundle, pid=proc.pid,
                                status=_STATUS[proc.state], stdin=stdin, stdout=stdout, stderr=stderr,
                                terminal=proc.terminal, exit_status=proc.exit_status, exec_id=proc.exec_id)
        if proc.exited_at is not None:
            resp.exited_at.CopyFrom(timestamp(proc.exited_at))
        return resp

    async def pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        container = self._container(req.id)
        async with self._agent() as agent:
            pids = await agent.list_processes(container.id)
        return pb.PidsResponse(processes=[task_types.ProcessInfo(pid=p) for p in pids])

    async def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        container = self._container(req.id)
        async with self._agent() as agent:
            stats = await agent.stats_container(container.id)
        metrics = metrics_v2.Metrics()
        metrics.cpu.usage_usec = stats.cpu.total_usage_ns // 1000
        metrics.cpu.user_usec = stats.cpu.user_ns // 1000
        metrics.cpu.system_usec = stats.cpu.kernel_ns // 1000
        metrics.memory.usage = stats.memory.usage
        metrics.memory.usage_limit = stats.memory.limit
        for key, value in stats.memory.stats.items():
            if key in metrics_v2.MemoryStat.DESCRIPTOR.fields_by_name:
                setattr(metrics.memory, key, value)
        metrics.pids.current = stats.pids.current
        metrics.pids.limit = stats.pids.limit
        return pb.StatsResponse(stats=pack_any(metrics))

    async def connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        container = self.containers.get(req.id)
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid if container else 0,
                                  version="kata-py")

    # --- control -------------------------------------------------------------------------------
    async def pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        container = self._container(req.id)
        container.init.require("pause", State.RUNNING)
        async with self._agent() as agent:
            await agent.pause_container(container.id)
        container.init.move(State.PAUSED)
        self.publisher.publish(ev.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    async def resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        container = self._container(req.id)
        container.init.require("resume", State.PAUSED)
        async with self._agent() as agent:
            await agent.resume_container(container.id)
        container.init.move(State.RUNNING)
        self.publisher.publish(ev.TaskResumed(container_id=container.id))
        return empty_pb2.Empty()

    async def checkpoint(self, req: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise Unimplemented("checkpoint is not supported by kata-py (the container runs in a VM)")

    async def resize_pty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        proc = self._process(req.id, req.exec_id)
        if not proc.terminal:
            raise FailedPrecondition(f"{proc.name} has no terminal")
        async with self._agent() as agent:
            await agent.tty_win_resize(req.id, req.exec_id, req.height, req.width)
        return empty_pb2.Empty()

    async def close_io(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        proc = self._process(req.id, req.exec_id)
        if req.stdin:
            proc.stdio.close_stdin()
        return empty_pb2.Empty()

    async def update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        container = self._container(req.id)
        resources = _json_any(req.resources, RESOURCES_URL, "update resources")
        if not isinstance(resources, dict):
            raise InvalidArgument("update resources: expected a LinuxResources object")
        try:
            update = ContainerResources.from_oci(resources)  # refuse what the VM sizing could not read
        except ValueError as exc:
            raise InvalidArgument(f"update resources: {exc}") from None
        async with self._agent() as agent:
            await agent.update_container(container.id, resources)
        container.resources = merge_update(container.resources, update)
        await self.sandbox.resources_changed(self.containers.values(), wait=True)
        return empty_pb2.Empty()

    async def shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        # containerd sends Shutdown once per container; the pod shim lives while any remains
        if not self.containers:
            self._shutdown.set()
            if self._stopped is not None:
                # containerd closes the connection on our answer and goes on (its Delete returns):
                # answer once the VM is gone, within containerd's 3 s shutdown timeout
                with trio.move_on_after(SHUTDOWN_WAIT_S):
                    await self._stopped.wait()
        return empty_pb2.Empty()

