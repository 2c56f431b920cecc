"""PodNetwork: the steps that mirror a pod's netns into its VM, and their undoing."""

from __future__ import annotations

import logging
import os
from typing import Protocol

import trio

from agent_client.protocol import Agent
from shim.network import host, translate
from shim.network.spec import netns_path as netns_path  # re-exported
from shim.network.translate import Endpoint

log = logging.getLogger(__name__)


class NicHost(Protocol):
    """What PodNetwork needs from the VM (QemuHypervisor)."""

    async def add_tap_nic(self, nic_id: str, tap_fd: int, mac: str, *, mtu: int = 0) -> str: ...


class PodNetwork:
    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._attached: list[tuple[int, str]] = []  # (veth index, tap name) to undo

    async def setup(self, vm: NicHost, agent: Agent) -> list[Endpoint]:
        """Tap + tc per interface, hot-plug the NICs, then configure the guest. Raises OSError
        (netlink, tun), VmmError (hot-plug), AgentError; call teardown() in any case."""
        dump = await trio.to_thread.run_sync(host.dump, self.netns)
        eps = translate.endpoints(dump.links, dump.addrs)
        guest_names: dict[int, str] = {}
        for n, ep in enumerate(eps):
            tap = ep.tap_name(n)
            fd = await trio.to_thread.run_sync(host.attach_tap, self.netns, ep.index, tap, ep.interface.mtu)
            self._attached.append((ep.index, tap))
            try:
                await vm.add_tap_nic(f"nic{n}", fd, ep.interface.hw_addr, mtu=ep.interface.mtu)
            finally:
                os.close(fd)  # QEMU holds its own copy now
            guest = await agent.update_interface(ep.interface)
            guest_names[ep.index] = guest.name
            log.info("netns %s: %s (%s) -> tap %s -> guest %s %s", self.netns, ep.name, ep.interface.hw_addr,
                     tap, guest.name, [f"{a.address}/{a.prefix_len}" for a in guest.addresses])
        if eps:
            await agent.update_routes(translate.routes(dump.routes, guest_names))
            neighbors = translate.neighbors(dump.neighbors, guest_names)
            if neighbors:
                await agent.add_arp_neighbors(neighbors)
        return eps

    async def teardown(self) -> None:
        """Remove our qdiscs and taps from the netns (the netns itself is not ours). Idempotent."""
        attached, self._attached = self._attached, []
        for veth_index, tap in attached:
            try:
                await trio.to_thread.run_sync(host.detach_tap, self.netns, veth_index, tap)
            except OSError as exc:
                log.warning("netns %s: removing tap %s: %s", self.netns, tap, exc)
