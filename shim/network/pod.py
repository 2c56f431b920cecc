"""PodNetwork: make the guest's network match the pod's netns (at start and after every change), and
undo it on the host."""

from __future__ import annotations

import logging
import os
import time
from typing import Protocol

import trio

from agent_client.errors import AgentError
from agent_client.protocol import Agent, ArpNeighbor, Interface, Route
from shim.network import diff, host, translate
from shim.network.diff import Mirrored
from shim.network.spec import netns_path as netns_path  # re-exported
from shim.network.translate import Endpoint

log = logging.getLogger(__name__)


class NicHost(Protocol):
    """What PodNetwork needs from the VM (QemuHypervisor)."""

    async def add_tap_nic(self, nic_id: str, tap_fd: int, mac: str, *, mtu: int = 0) -> str: ...

    async def remove_nic(self, nic_id: str) -> None: ...


class PodNetwork:
    """What the guest was last given, and the steps that change it. One caller at a time."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.mirrored: dict[int, Mirrored] = {}  # by veth index in the netns
        self.routes: frozenset[Route] = frozenset()
        self.neighbors: frozenset[ArpNeighbor] = frozenset()
        self._taps: dict[str, int] = {}  # tap name -> veth index, every tap to remove at teardown
        self._next = 0  # tap/NIC number; never reused, so a NIC still unplugging cannot clash

    async def setup(self, vm: NicHost, agent: Agent) -> list[Endpoint]:
        """The first sync; returns the mirrored endpoints. Raises like sync()."""
        await self.sync(vm, agent)
        return [m.endpoint for m in self.mirrored.values()]

    async def sync(self, vm: NicHost, agent: Agent) -> bool:
        """Dump the netns and apply the difference to what was last applied: gone veths lose their
        NIC and tap, new ones get a tap + tc mirred + hot-plugged NIC, changed addresses/MTU are
        updated, then the full route set (when it changed) and new static neighbours.

        Returns whether anything was applied. Raises OSError (netlink, tun), VmmError (hot-plug),
        AgentError; what was applied before an error is remembered, so calling again retries the
        rest. Call teardown() in any case.
        """
        dump = await trio.to_thread.run_sync(host.dump, self.netns)
        links = diff.links(self.mirrored, translate.endpoints(dump.links, dump.addrs))
        for m in links.remove:  # first: frees root ports for what comes next
            await self._remove(m, vm, agent)
        for ep in links.add:
            await self._add(ep, vm, agent)
        for m, ep in links.update:
            guest = await agent.update_interface(ep.interface)
            self.mirrored[ep.index] = Mirrored(ep, m.tap, m.nic_id, guest.name)
            log.info("netns %s: %s now %s mtu %s", self.netns, ep.name, _addrs(guest), ep.interface.mtu)
        names = {i: m.guest_name for i, m in self.mirrored.items()}
        wanted_routes = translate.routes(dump.routes, names)
        routes = diff.routes(self.routes, wanted_routes)
        if routes is not None:
            await agent.update_routes(routes)
            self.routes = frozenset(routes)
            log.info("netns %s: guest routes %s", self.netns, [f"{r.dest or 'default'} {r.gateway} {r.device}"
                                                               for r in routes])
        neighbors = diff.neighbors(self.neighbors, translate.neighbors(dump.neighbors, names))
        if neighbors:
            await agent.add_arp_neighbors(neighbors)
            self.neighbors |= set(neighbors)
        return bool(links or routes is not None or neighbors)

    async def _add(self, ep: Endpoint, vm: NicHost, agent: Agent) -> None:
        n, self._next = self._next, self._next + 1
        tap, nic = ep.tap_name(n), f"nic{n}"
        t0 = time.monotonic()
        fd = await trio.to_thread.run_sync(host.attach_tap, self.netns, ep.index, tap, ep.interface.mtu)
        self._taps[tap] = ep.index
        t1 = time.monotonic()
        try:
            try:
                await vm.add_tap_nic(nic, fd, ep.interface.hw_addr, mtu=ep.interface.mtu)
            finally:
                os.close(fd)  # QEMU holds its own copy now
            t2 = time.monotonic()
            guest = await agent.update_interface(ep.interface)
        except Exception as exc:
            # half a NIC helps no one: take it away so the next sync starts this one afresh
            try:
                await self._unplug(nic, tap, ep.index, vm)
            except Exception as undo:
                log.warning("netns %s: undoing %s: %s", self.netns, nic, undo)
            raise exc
        self.mirrored[ep.index] = Mirrored(ep, tap, nic, guest.name)
        log.info("netns %s: %s (%s) -> tap %s -> guest %s %s (tap %.3f s, hot-plug %.3f s, guest %.3f s)",
                 self.netns, ep.name, ep.interface.hw_addr, tap, guest.name, _addrs(guest), t1 - t0, t2 - t1,
                 time.monotonic() - t2)

    async def _remove(self, m: Mirrored, vm: NicHost, agent: Agent) -> None:
        iface = m.endpoint.interface
        try:
            # the guest drops the addresses (and the routes through them) at once, even when the
            # unplug below takes the guest a while or never completes
            await agent.update_interface(Interface(m.guest_name, iface.hw_addr, iface.mtu, ()))
        except AgentError as exc:
            log.warning("netns %s: clearing guest %s: %s", self.netns, m.guest_name, exc)
        await self._unplug(m.nic_id, m.tap, m.endpoint.index, vm)
        self.mirrored.pop(m.endpoint.index, None)
        log.info("netns %s: %s (%s) gone: guest %s unplugged, tap %s removed", self.netns, m.endpoint.name,
                 iface.hw_addr, m.guest_name, m.tap)

    async def _unplug(self, nic: str, tap: str, veth_index: int, vm: NicHost) -> None:
        await vm.remove_nic(nic)
        await trio.to_thread.run_sync(host.detach_tap, self.netns, veth_index, tap)
        self._taps.pop(tap, None)

    async def teardown(self) -> None:
        """Remove our qdiscs and taps from the netns (the netns itself is not ours). Idempotent."""
        taps, self._taps = self._taps, {}
        self.mirrored.clear()
        for tap, veth_index in taps.items():
            try:
                await trio.to_thread.run_sync(host.detach_tap, self.netns, veth_index, tap)
            except OSError as exc:
                log.warning("netns %s: removing tap %s: %s", self.netns, tap, exc)


def _addrs(i: Interface) -> list[str]:
    return [f"{a.address}/{a.prefix_len}" for a in i.addresses]
