"""PodNetwork + follow() against a real netns, with a fake VM and the FakeAgent: changes made in the
netns after setup reach the (fake) guest, a failing step is retried, and teardown leaves nothing."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest
import trio

from agent_client.errors import AgentUnavailable
from agent_client.fake import FakeAgent
from agent_client.protocol import Interface
from shim.network import follow as follow_mod
from shim.network.follow import follow
from shim.network.pod import PodNetwork

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class FakeVm:
    """Plugging a NIC makes the FakeAgent see a guest interface with that MAC (as the guest kernel would)."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.nics: dict[str, tuple[str, int]] = {}  # nic id -> (MAC, our copy of the tap fd)
        self._n = 0

    async def add_tap_nic(self, nic_id: str, tap_fd: int, mac: str, *, mtu: int = 0) -> str:
        self.nics[nic_id] = (mac, os.dup(tap_fd))  # like QEMU: the tap lives while we hold it
        self.agent.interfaces.append(Interface(f"eth{self._n}", mac, mtu))
        self._n += 1
        return "rp0"

    async def remove_nic(self, nic_id: str) -> None:
        mac, fd = self.nics.pop(nic_id, ("", -1))
        if fd >= 0:
            os.close(fd)
        self.agent.interfaces = [i for i in self.agent.interfaces if i.hw_addr != mac]

    def stop(self) -> None:
        for nic in list(self.nics):
            os.close(self.nics.pop(nic)[1])


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


def netns_text(netns: str) -> str:
    return (subprocess.run(["ip", "-n", netns, "link"], capture_output=True, text=True).stdout
            + subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "show"], capture_output=True,
                             text=True).stdout)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpnet-f{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        ip(name, "addr", "add", "10.99.0.10/24", "dev", "eth0")
        ip(name, "link", "set", "eth0", "up")
        ip(name, "link", "set", "peer0", "up")
        ip(name, "route", "add", "default", "via", "10.99.0.1")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def taps(netns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if "_kata" in line}


def mac_of(netns: str, dev: str) -> str:
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show", dev], capture_output=True, text=True,
                         check=True).stdout
    return out.split("link/ether ")[1].split()[0]


async def until(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = trio.current_time() + timeout
    while not cond():  # polled: the changes arrive through netlink and the follower's debounce
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out: {what}")
        await trio.sleep(0.05)


def guest_addrs(agent: FakeAgent) -> dict[str, set[str]]:
    return {i.hw_addr: {f"{a.address}/{a.prefix_len}" for a in i.addresses} for i in agent.interfaces}


async def test_changes_after_setup_follow_into_the_guest(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow_mod, "RETRY_S", 0.5)
    agent = FakeAgent()
    vm = FakeVm(agent)
    net = PodNetwork(f"/var/run/netns/{netns}")
    eth0, peer0 = mac_of(netns, "eth0"), mac_of(netns, "peer0")
    try:
        await net.setup(vm, agent)
        # both ends of the pair live in this netns, so both are mirrored
        assert guest_addrs(agent) == {eth0: {"10.99.0.10/24"}, peer0: set()}
        assert ("", "10.99.0.1") in {(r.dest, r.gateway) for r in agent.routes}
        async with trio.open_nursery() as nursery:
            await nursery.start(follow, net, vm, agent)

            # an address and a route: UpdateInterface and a new full route set
            ip(netns, "addr", "add", "10.99.1.20/24", "dev", "eth0")
            ip(netns, "route", "add", "10.98.0.0/16", "via", "10.99.0.1")
            await until(lambda: "10.98.0.0/16" in {r.dest for r in agent.routes}, "route in the guest")
            assert guest_addrs(agent)[eth0] == {"10.99.0.10/24", "10.99.1.20/24"}

            # a new link: tap + NIC + its address; the guest refuses once, the retry gets it
            agent.fail("update_interface", AgentUnavailable("flaky", method="update_interface"))
            ip(netns, "link", "add", "eth1", "type", "veth", "peer", "name", "peer1")  # two new links
            ip(netns, "addr", "add", "10.97.0.5/24", "dev", "eth1")
            ip(netns, "link", "set", "eth1", "up")
            eth1 = mac_of(netns, "eth1")
            await until(lambda: guest_addrs(agent).get(eth1) == {"10.97.0.5/24"}, "eth1 in the guest")
            assert len(taps(netns)) == 4  # eth0, peer0, eth1, peer1 (the failed try left none)

            # and all of it taken away again
            ip(netns, "route", "del", "10.98.0.0/16")
            ip(netns, "addr", "del", "10.99.1.20/24", "dev", "eth0")
            ip(netns, "link", "del", "eth1")
            await until(lambda: eth1 not in guest_addrs(agent) and len(vm.nics) == 2
                        and "10.98.0.0/16" not in {r.dest for r in agent.routes}, "the guest follows removal")
            assert guest_addrs(agent)[eth0] == {"10.99.0.10/24"}
            assert {m.tap for m in net.mirrored.values()} == {"tap0_kata", "tap1_kata"}
            assert taps(netns) == {"tap0_kata", "tap1_kata"}  # eth1's (and the failed try's) are gone
            nursery.cancel_scope.cancel()
    finally:
        vm.stop()
        await net.teardown()
    text = netns_text(netns)
    assert "_kata" not in text and "ingress" not in text, text


async def test_follow_survives_a_failing_sync(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow_mod, "RETRY_S", 0.2)
    agent = FakeAgent()
    vm = FakeVm(agent)
    net = PodNetwork(f"/var/run/netns/{netns}")
    try:
        await net.setup(vm, agent)
        agent.fail("update_routes", AgentUnavailable("down", method="update_routes"), times=3)
        async with trio.open_nursery() as nursery:
            await nursery.start(follow, net, vm, agent)
            ip(netns, "route", "add", "10.98.0.0/16", "via", "10.99.0.1")
            await until(lambda: "10.98.0.0/16" in {r.dest for r in agent.routes}, "route after retries")
            assert agent.methods_called().count("update_routes") >= 4
            nursery.cancel_scope.cancel()
    finally:
        vm.stop()
        await net.teardown()
