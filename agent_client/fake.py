"""`FakeAgent`: an in-memory `Agent` for unit tests of the shim.

It keeps the container/process state machine an agent keeps (created → running ⇄ paused → stopped),
plays scripted output and exit codes, records every call, and can be told to fail or hang a call.

Scripting a process (init process: exec_id ""):
    fake.script("c1", stdout=[b"hi\n"], exit_code=3)            # exits on start with status 3
    fake.script("c1", "e1", exit_code=None)                      # runs until signalled or `exit()`
    fake.script("c1", echo_stdin=True, exit_code=None)           # stdin comes back on stdout (like cat)
Driving it: `fake.exit("c1", "", 0)`, `fake.emit_stdout(...)`, `fake.emit_oom("c1")`.
Faults: `fake.fail("start_container", AgentInternal("boom"))` (next call, `times=` for more),
`fake.hang("wait_process")` (blocks until cancelled), `fake.release("wait_process")`.
Port forwarding: `fake.listen(8080)` (an echo server) or `fake.listen(8080, handler)`, where the async
`handler(conn)` serves each connection (`conn.receive()` -> b"" at the host's eof, `conn.send()`,
`conn.send_eof()`; raising resets it); a port nobody listens on is refused.
"""

from __future__ import annotations

import enum
import signal as signals
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from agent_client.errors import (
    AgentAlreadyExists,
    AgentError,
    AgentFailedPrecondition,
    AgentInternal,
    AgentNotFound,
    AgentUnavailable,
)
from agent_client.protocol import (
    AgentVersion,
    ArpNeighbor,
    ContainerStats,
    GuestDetails,
    Interface,
    OnlineResources,
    PortForwardStream,
    Route,
    Storage,
)

_TERMINATING = {signals.SIGKILL, signals.SIGTERM, signals.SIGINT, signals.SIGHUP, signals.SIGQUIT}


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class Script:
    """What a fake process does: output it prints when started, and how it ends."""

    stdout: Sequence[bytes] = ()
    stderr: Sequence[bytes] = ()
    exit_code: int | None = 0  # None = runs until signalled or fake.exit()
    echo_stdin: bool = False


class _Pipe:
    """A byte stream with one reader: chunks appended by the fake, EOF on close."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = False
        self._changed = trio.Event()

    def write(self, data: bytes) -> None:
        if not self.closed and data:
            self.chunks.append(data)
            self._notify()

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read_all(self) -> AsyncIterator[bytes]:
        i = 0
        while True:
            if i < len(self.chunks):
                i += 1
                yield self.chunks[i - 1]
            elif self.closed:
                return
            else:
                await self._changed.wait()


@dataclass
class FakeProcess:
    pid: int
    script: Script
    stdin_enabled: bool
    terminal: bool
    spec: Mapping[str, Any] | None = None
    started: bool = False
    exit_code: int | None = None
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    winsize: tuple[int, int] | None = None
    signals: list[int] = field(default_factory=list)
    exited: trio.Event = field(default_factory=trio.Event)
    out: _Pipe = field(default_factory=_Pipe)
    err: _Pipe = field(default_factory=_Pipe)


@dataclass
class FakeContainer:
    cid: str
    spec: Mapping[str, Any]
    rootfs: Storage
    storages: tuple[Storage, ...]
    state: State = State.CREATED
    processes: dict[str, FakeProcess] = field(default_factory=dict)
    resources: list[Mapping[str, Any]] = field(default_factory=list)
    stats: ContainerStats = field(default_factory=ContainerStats)


class FakeConnection:
    """One end of a fake forwarded connection (the host's is a PortForwardStream, the guest's the
    handler's `conn`): bytes in, bytes out, b"" after the peer's eof."""

    def __init__(self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes],
                 broken: list[AgentError]) -> None:
        self._send, self._receive, self._broken = send, receive, broken
        self.eof_sent = self.eof_received = False

    async def send(self, data: bytes) -> None:
        self._check()
        if data:
            try:
                await self._send.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._check()
                raise AgentInternal("port-forward: peer gone", method="port_forward") from None

    async def send_eof(self) -> None:
        self.eof_sent = True
        await self._send.aclose()

    async def receive(self) -> bytes:
        """What the peer sent before it broke still arrives; then its error."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._check()
            self.eof_received = True
            return b""

    def _check(self) -> None:
        if self._broken:
            raise self._broken[0]


async def _echo(conn: FakeConnection) -> None:
    while data := await conn.receive():
        await conn.send(data)
    await conn.send_eof()


@dataclass(frozen=True)
class Call:
    method: str
    args: tuple[Any, ...]


class FakeAgent:
    """In-memory `Agent`. All state is public for assertions; see the module docstring for scripting."""

    def __init__(self, *, online_cpus: int = 1, mem_total_bytes: int = 2 << 30) -> None:
        self.calls: list[Call] = []
        self.sandbox: dict[str, Any] | None = None
        self.containers: dict[str, FakeContainer] = {}
        self.clock: float | None = None
        self.entropy = bytearray()
        self.online_cpus = online_cpus
        self.mem_total_bytes = mem_total_bytes
        self.interfaces: list[Interface] = []  # the guest NICs a test plugged in
        self.routes: list[Route] = []
        self.neighbors: list[ArpNeighbor] = []
        self.serving = True
        self.closed = False
        self.listeners: dict[int, Callable[[FakeConnection], Awaitable[None]]] = {}
        self.forwarded_live = 0  # port-forward connections open now
        self._scripts: dict[tuple[str, str], Script] = {}
        self._failures: dict[str, list[AgentError]] = {}
        self._hangs: dict[str, trio.Event] = {}
        self._oom_send, self._oom_recv = trio.open_memory_channel[str](1000)
        self._next_pid = 100
        self._closed_event = trio.Event()

    # --- scripting and faults ---

    def script(self, cid: str, exec_id: str = "", **kwargs: Any) -> Script:
        """Set what the next process (cid, exec_id) does; see `Script`."""
        s = self._scripts[(cid, exec_id)] = Script(**kwargs)
        return s

    def fail(self, method: str, error: AgentError, times: int = 1) -> None:
        """Make the next `times` calls of `method` raise `error` (before any state changes)."""
        self._failures.setdefault(method, []).extend([error] * times)

    def hang(self, method: str) -> None:
        """Make calls of `method` block until cancelled or `release(method)`."""
        self._hangs[method] = trio.Event()

    def release(self, method: str) -> None:
        event = self._hangs.pop(method, None)
        if event is not None:
            event.set()

    def exit(self, cid: str, exec_id: str, code: int) -> None:
        """Make a running process exit with `code` (its output streams hit EOF)."""
        self._exit(self._process(cid, exec_id), code)

    def emit_stdout(self, cid: str, exec_id: str, data: bytes) -> None:
        self._process(cid, exec_id).out.write(data)

    def emit_stderr(self, cid: str, exec_id: str, data: bytes) -> None:
        self._process(cid, exec_id).err.write(data)

    def emit_oom(self, cid: str) -> None:
        self._oom_send.send_nowait(cid)

    def listen(self, port: int, handler: Callable[[FakeConnection], Awaitable[None]] = _echo) -> None:
        """Let port_forward reach `port`; `handler(conn)` serves each connection (default: echo)."""
        self.listeners[port] = handler

    def methods_called(self) -> list[str]:
        return [c.method for c in self.calls]

    # --- internals ---

    async def _enter(self, method: str, *args: Any) -> None:
        """Record the call, then apply an injected failure or hang."""
        self.calls.append(Call(method, args))
        if self.closed:
            raise AgentUnavailable("agent client closed", method=method)
        failures = self._failures.get(method)
        if failures:
            raise failures.pop(0)
        if method in self._hangs:
            await self._until(self._hangs[method], method)

    async def _until(self, event: trio.Event, method: str) -> None:
        """Wait for `event`; aclose() ends the wait with AgentUnavailable, as a closed channel would."""

        async def wake(e: trio.Event, nursery: trio.Nursery) -> None:
            await e.wait()
            nursery.cancel_scope.cancel()

        if not self.closed:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wake, event, nursery)
                nursery.start_soon(wake, self._closed_event, nursery)
        if self.closed:
            raise AgentUnavailable("agent client closed", method=method)

    def _container(self, cid: str, method: str = "") -> FakeContainer:
        try:
            return self.containers[cid]
        except KeyError:
            raise AgentNotFound(f"container {cid} not found", method=method) from None

    def _process(self, cid: str, exec_id: str, method: str = "") -> FakeProcess:
        try:
            return self._container(cid, method).processes[exec_id]
        except KeyError:
            raise AgentNotFound(f"process {cid}/{exec_id} not found", method=method) from None

    def _new_process(self, cid: str, exec_id: str, terminal: bool, stdin: bool, spec: Any = None) -> FakeProcess:
        self._next_pid += 1
        script = self._scripts.pop((cid, exec_id), Script())
        return FakeProcess(pid=self._next_pid, script=script, stdin_enabled=stdin, terminal=terminal, spec=spec)

    def _run(self, proc: FakeProcess) -> None:
        proc.started = True
        for chunk in proc.script.stdout:
            proc.out.write(chunk)
        for chunk in proc.script.stderr:
            proc.err.write(chunk)
        if proc.script.exit_code is not None:
            self._exit(proc, proc.script.exit_code)

    def _exit(self, proc: FakeProcess, code: int) -> None:
        if proc.exit_code is not None:
            return
        proc.exit_code = code
        proc.out.close()
        proc.err.close()
        proc.exited.set()
        for c in self.containers.values():
            init = c.processes.get("")
            if init is proc:
                c.state = State.STOPPED
                for other in c.processes.values():  # the pid namespace dies with its init
                    if other is not proc:
                        self._exit(other, 128 + signals.SIGKILL)

    def _require(self, c: FakeContainer, method: str, *states: State) -> None:
        if c.state not in states:
            raise AgentFailedPrecondition(f"container {c.cid} is {c.state.value}", method=method)

    # --- sandbox ---

    async def create_sandbox(
        self, hostname: str, dns: Sequence[str], storages: Sequence[Storage], sandbox_id: str, machine_id: str
    ) -> None:
        await self._enter("create_sandbox", hostname, tuple(dns), tuple(storages), sandbox_id, machine_id)
        if self.sandbox is not None:
            raise AgentAlreadyExists("sandbox already created", method="create_sandbox")
        self.sandbox = {"hostname": hostname, "dns": list(dns), "storages": list(storages),
                        "sandbox_id": sandbox_id, "machine_id": machine_id}

    async def destroy_sandbox(self) -> None:
        await self._enter("destroy_sandbox")
        for c in self.containers.values():
            for p in c.processes.values():
                self._exit(p, 128 + signals.SIGKILL)
        self.containers.clear()
        self.sandbox = None

    async def guest_details(self) -> GuestDetails:
        await self._enter("guest_details")
        return GuestDetails(
            mem_block_size_bytes=128 << 20,
            online_cpus=self.online_cpus,
            mem_total_bytes=self.mem_total_bytes,
            kernel_release="6.1.0-fake",
            agent_version="fake",
            oci_runtime="runc",
            storage_handlers=("9p", "blk", "ephemeral", "local"),
        )

    async def set_guest_datetime(self, t: float) -> None:
        await self._enter("set_guest_datetime", t)
        self.clock = t

    async def reseed_random(self, data: bytes) -> None:
        await self._enter("reseed_random", data)
        self.entropy += data

    # --- containers ---

    async def create_container(
        self,
        cid: str,
        oci_spec: Mapping[str, Any],
        rootfs: Storage,
        storages: Sequence[Storage] = (),
        terminal: bool = False,
        stdin: bool = False,
    ) -> int:
        await self._enter("create_container", cid, oci_spec, rootfs, tuple(storages), terminal, stdin)
        if self.sandbox is None:
            raise AgentFailedPrecondition("sandbox not created", method="create_container")
        if cid in self.containers:
            raise AgentAlreadyExists(f"container {cid} already exists", method="create_container")
        c = FakeContainer(cid, oci_spec, rootfs, tuple(storages))
        c.processes[""] = self._new_process(cid, "", terminal, stdin, oci_spec.get("process"))
        self.containers[cid] = c
        return c.processes[""].pid

    async def start_container(self, cid: str) -> None:
        await self._enter("start_container", cid)
        c = self._container(cid, "start_container")
        self._require(c, "start_container", State.CREATED)
        c.state = State.RUNNING
        self._run(c.processes[""])

    async def remove_container(self, cid: str, timeout: float) -> None:
        await self._enter("remove_container", cid, timeout)
        c = self._container(cid, "remove_container")
        for p in c.processes.values():
            self._exit(p, 128 + signals.SIGKILL)
        del self.containers[cid]

    async def update_container(self, cid: str, linux_resources: Mapping[str, Any]) -> None:
        await self._enter("update_container", cid, linux_resources)
        c = self._container(cid, "update_container")
        self._require(c, "update_container", State.CREATED, State.RUNNING, State.PAUSED)
        c.resources.append(linux_resources)

    async def stats_container(self, cid: str) -> ContainerStats:
        await self._enter("stats_container", cid)
        return self._container(cid, "stats_container").stats

    async def pause_container(self, cid: str) -> None:
        await self._enter("pause_container", cid)
        c = self._container(cid, "pause_container")
        self._require(c, "pause_container", State.RUNNING)
        c.state = State.PAUSED

    async def resume_container(self, cid: str) -> None:
        await self._enter("resume_container", cid)
        c = self._container(cid, "resume_container")
        self._require(c, "resume_container", State.PAUSED)
        c.state = State.RUNNING

    async def list_processes(self, cid: str) -> list[int]:
        await self._enter("list_processes", cid)
        c = self._container(cid, "list_processes")
        return [p.pid for p in c.processes.values() if p.started and p.exit_code is None]

    # --- processes ---

    async def exec_process(
        self, cid: str, exec_id: str, process: Mapping[str, Any], terminal: bool = False, stdin: bool = False
    ) -> int:
        await self._enter("exec_process", cid, exec_id, process, terminal, stdin)
        c = self._container(cid, "exec_process")
        self._require(c, "exec_process", State.RUNNING)
        if not exec_id or exec_id in c.processes:
            raise AgentAlreadyExists(f"exec {cid}/{exec_id!r} already exists", method="exec_process")
        p = c.processes[exec_id] = self._new_process(cid, exec_id, terminal, stdin, process)
        self._run(p)
        return p.pid

    async def signal_process(self, cid: str, exec_id: str, signal: int, all: bool = False) -> None:
        await self._enter("signal_process", cid, exec_id, signal, all)
        c = self._container(cid, "signal_process")
        targets = list(c.processes.values()) if all and not exec_id else [self._process(cid, exec_id)]
        for p in targets:
            # a created (not started) init is a real process waiting in runc: signals reach it too
            if p.exit_code is not None:
                continue
            p.signals.append(signal)
            if signal in _TERMINATING:
                self._exit(p, 128 + signal)

    async def wait_process(self, cid: str, exec_id: str) -> int:
        await self._enter("wait_process", cid, exec_id)
        p = self._process(cid, exec_id, "wait_process")
        await self._until(p.exited, "wait_process")
        assert p.exit_code is not None
        return p.exit_code

    async def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int:
        await self._enter("write_stdin", cid, exec_id, data)
        p = self._process(cid, exec_id, "write_stdin")
        if not p.stdin_enabled or p.stdin_closed or p.exit_code is not None:
            raise AgentFailedPrecondition(f"stdin of {cid}/{exec_id} is not open", method="write_stdin")
        p.stdin += data
        if p.script.echo_stdin:
            p.out.write(data)
        return len(data)

    async def close_stdin(self, cid: str, exec_id: str) -> None:
        await self._enter("close_stdin", cid, exec_id)
        p = self._process(cid, exec_id, "close_stdin")
        p.stdin_closed = True
        if p.script.echo_stdin and p.script.exit_code is None:
            self._exit(p, 0)  # like cat: EOF on stdin ends it

    async def _read(self, method: str, cid: str, exec_id: str, stderr: bool) -> AsyncIterator[bytes]:
        await self._enter(method, cid, exec_id)
        p = self._process(cid, exec_id, method)
        async for chunk in (p.err if stderr else p.out).read_all():
            yield chunk

    def read_stdout(self, cid: str, exec_id: str) -> AsyncIterator[bytes]:
        return self._read("read_stdout", cid, exec_id, stderr=False)

    def read_stderr(self, cid: str, exec_id: str) -> AsyncIterator[bytes]:
        return self._read("read_stderr", cid, exec_id, stderr=True)

    async def tty_win_resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        await self._enter("tty_win_resize", cid, exec_id, rows, cols)
        p = self._process(cid, exec_id, "tty_win_resize")
        if not p.terminal:
            raise AgentFailedPrecondition(f"{cid}/{exec_id} has no terminal", method="tty_win_resize")
        p.winsize = (rows, cols)

    # --- resources, events, health ---

    async def online_cpu_mem(self, nb_cpus: int, wait: bool) -> OnlineResources:
        await self._enter("online_cpu_mem", nb_cpus, wait)
        if nb_cpus:
            self.online_cpus = nb_cpus
        return OnlineResources(self.online_cpus, self.mem_total_bytes)

    # --- network: the guest's interfaces are those the test put in `self.interfaces` (by MAC) ---
    async def update_interface(self, interface: Interface) -> Interface:
        await self._enter("update_interface", interface)
        found = next((i for i in self.interfaces if i.hw_addr.lower() == interface.hw_addr.lower()), None)
        if found is None:
            raise AgentNotFound(f"no interface with MAC {interface.hw_addr}")
        updated = Interface(found.name, found.hw_addr, interface.mtu or found.mtu, interface.addresses)
        self.interfaces = [updated if i is found else i for i in self.interfaces]
        return updated

    async def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        await self._enter("update_routes", list(routes))
        self.routes = list(routes)
        return list(self.routes)

    async def add_arp_neighbors(self, neighbors: Sequence[ArpNeighbor]) -> None:
        await self._enter("add_arp_neighbors", list(neighbors))
        self.neighbors.extend(neighbors)

    async def list_interfaces(self) -> list[Interface]:
        await self._enter("list_interfaces")
        return list(self.interfaces)

    async def list_routes(self) -> list[Route]:
        await self._enter("list_routes")
        return list(self.routes)

    # --- port forwarding: the guest's listeners are those the test made with `listen()` ---
    @asynccontextmanager
    async def port_forward(self, port: int, family: int = 4) -> AsyncIterator[PortForwardStream]:
        await self._enter("port_forward", port, family)
        handler = self.listeners.get(port)
        if handler is None:
            raise AgentFailedPrecondition(f"port {port} in the pod: connect 127.0.0.1: Connection refused",
                                          method="port_forward")
        to_guest_send, to_guest_receive = trio.open_memory_channel[bytes](4)
        to_host_send, to_host_receive = trio.open_memory_channel[bytes](4)
        broken: list[AgentError] = []
        host = FakeConnection(to_guest_send, to_host_receive, broken)
        guest = FakeConnection(to_host_send, to_guest_receive, broken)

        done = trio.Event()

        async def serve() -> None:
            try:
                await handler(guest)
                done.set()
            except Exception as exc:  # the guest's connection broke: the host's calls fail
                broken.append(AgentInternal(f"port-forward: {exc}", method="port_forward"))
                await to_host_send.aclose()
                await to_guest_receive.aclose()

        self.forwarded_live += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                try:
                    yield host
                    if host.eof_sent and host.eof_received:  # as the real one: the guest finishes
                        with trio.move_on_after(5):
                            await done.wait()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.forwarded_live -= 1

    async def oom_events(self) -> AsyncIterator[str]:
        await self._enter("oom_events")
        async for cid in self._oom_recv:
            yield cid

    async def check(self) -> bool:
        await self._enter("check")
        return self.serving

    async def version(self) -> AgentVersion:
        await self._enter("version")
        return AgentVersion(grpc_version="fake", agent_version="fake")

    async def aclose(self) -> None:
        self.closed = True
        self._closed_event.set()
        self._oom_send.close()
