"""FakeAgent: the state machine, scripted processes, recorded calls and injected faults."""

from __future__ import annotations

import signal
from contextlib import aclosing

import pytest
import trio

from agent_client.errors import (
    AgentAlreadyExists,
    AgentFailedPrecondition,
    AgentInternal,
    AgentNotFound,
    AgentUnavailable,
)
from agent_client.fake import FakeAgent, State
from agent_client.protocol import Agent, Storage

ROOTFS = Storage("9p", "kataShared", "/run/kata-py/shared/containers/c1/rootfs")


async def collect(it) -> bytes:
    async with aclosing(it) as chunks:
        return b"".join([c async for c in chunks])


@pytest.fixture
async def agent() -> FakeAgent:
    fake = FakeAgent()
    await fake.create_sandbox("pod", ["10.0.0.1"], [], "sb1", "m" * 32)
    return fake


def test_fake_implements_the_interface() -> None:
    assert isinstance(FakeAgent(), Agent)


async def test_container_lifecycle_and_scripted_exit(agent: FakeAgent) -> None:
    agent.script("c1", stdout=[b"hello\n"], stderr=[b"warn\n"], exit_code=3)
    pid = await agent.create_container("c1", {"process": {"args": ["x"]}}, ROOTFS)
    assert pid > 0
    assert agent.containers["c1"].state is State.CREATED
    await agent.start_container("c1")
    assert await agent.wait_process("c1", "") == 3
    assert agent.containers["c1"].state is State.STOPPED
    assert await collect(agent.read_stdout("c1", "")) == b"hello\n"
    assert await collect(agent.read_stderr("c1", "")) == b"warn\n"
    await agent.remove_container("c1", 5)
    assert "c1" not in agent.containers
    assert agent.methods_called()[-1] == "remove_container"


async def test_illegal_transitions_are_refused(agent: FakeAgent) -> None:
    with pytest.raises(AgentFailedPrecondition):
        await FakeAgent().create_container("c1", {}, ROOTFS)  # no sandbox yet
    with pytest.raises(AgentAlreadyExists):
        await agent.create_sandbox("pod", [], [], "sb1", "m")
    agent.script("c1", exit_code=None)
    await agent.create_container("c1", {}, ROOTFS)
    with pytest.raises(AgentAlreadyExists):
        await agent.create_container("c1", {}, ROOTFS)
    with pytest.raises(AgentFailedPrecondition):
        await agent.pause_container("c1")  # created, not running
    await agent.start_container("c1")
    with pytest.raises(AgentFailedPrecondition):
        await agent.start_container("c1")
    await agent.pause_container("c1")
    assert agent.containers["c1"].state is State.PAUSED
    await agent.resume_container("c1")
    with pytest.raises(AgentNotFound):
        await agent.start_container("nope")
    with pytest.raises(AgentNotFound):
        await agent.wait_process("c1", "nope")


async def test_exec_signal_and_namespace_teardown(agent: FakeAgent) -> None:
    agent.script("c1", exit_code=None)
    await agent.create_container("c1", {}, ROOTFS)
    await agent.start_container("c1")
    agent.script("c1", "e1", exit_code=None)
    epid = await agent.exec_process("c1", "e1", {"args": ["sleep", "inf"]})
    assert sorted(await agent.list_processes("c1")) == sorted([agent.containers["c1"].processes[""].pid, epid])
    with pytest.raises(AgentAlreadyExists):
        await agent.exec_process("c1", "e1", {})
    await agent.signal_process("c1", "e1", signal.SIGUSR1)  # not terminating: still running
    assert agent.containers["c1"].processes["e1"].exit_code is None
    await agent.signal_process("c1", "", signal.SIGTERM)
    assert await agent.wait_process("c1", "") == 128 + signal.SIGTERM
    assert await agent.wait_process("c1", "e1") == 128 + signal.SIGKILL  # died with the pid namespace


async def test_stdin_echo_and_live_output(agent: FakeAgent) -> None:
    agent.script("c1", echo_stdin=True, exit_code=None)
    await agent.create_container("c1", {}, ROOTFS, stdin=True)
    await agent.start_container("c1")
    got: list[bytes] = []

    async def read() -> None:
        async with aclosing(agent.read_stdout("c1", "")) as it:
            async for chunk in it:
                got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        assert await agent.write_stdin("c1", "", b"ping") == 4
        agent.emit_stdout("c1", "", b"!")
        await agent.close_stdin("c1", "")  # cat-like: EOF on stdin → exit 0 → stdout EOF
    assert b"".join(got) == b"ping!"
    assert await agent.wait_process("c1", "") == 0
    with pytest.raises(AgentFailedPrecondition):
        await agent.write_stdin("c1", "", b"late")


async def test_injected_failure_hang_and_close(agent: FakeAgent) -> None:
    agent.fail("check", AgentInternal("boom"), times=2)
    for _ in range(2):
        with pytest.raises(AgentInternal, match="boom"):
            await agent.check()
    assert await agent.check() is True
    agent.hang("version")
    with trio.move_on_after(0.05) as scope:
        await agent.version()
    assert scope.cancelled_caught
    agent.release("version")
    assert (await agent.version()).agent_version == "fake"

    agent.script("c1", exit_code=None)
    await agent.create_container("c1", {}, ROOTFS)
    await agent.start_container("c1")

    async def close_soon() -> None:
        await trio.sleep(0.01)
        await agent.aclose()  # like a dead channel: the blocked wait fails

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_soon)
        with pytest.raises(AgentUnavailable):
            await agent.wait_process("c1", "")


async def test_oom_events_and_resources(agent: FakeAgent) -> None:
    agent.emit_oom("c1")
    agent.emit_oom("c2")
    seen = []
    async with aclosing(agent.oom_events()) as events:
        async for cid in events:
            seen.append(cid)
            if len(seen) == 2:
                break
    assert seen == ["c1", "c2"]
    assert await agent.online_cpu_mem(3, wait=True) == (3, 2 << 30)
    assert (await agent.guest_details()).online_cpus == 3
    await agent.set_guest_datetime(1700000000.5)
    assert agent.clock == 1700000000.5
