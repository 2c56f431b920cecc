"""The agent's network configuration (agent/network.py) against real `ip`, in a throw-away netns."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from agent import network
from agent.errors import InvalidArgument, NotFound

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and ip")

MAC = "02:00:00:aa:bb:01"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpnet-a{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sh = ["ip", "netns", "exec", name, "ip"]
        # a veth stands in for the guest's virtio NIC (no dummy module on this kernel)
        subprocess.run([*sh, "link", "add", "eth0", "address", MAC, "type", "veth", "peer", "name", "peer0"],
                       check=True)
        subprocess.run([*sh, "link", "set", "peer0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str) -> network.Network:
    def run(argv: list[str], **kw):
        return subprocess.run(["ip", "netns", "exec", name, *argv], **kw)
    return network.Network(network.Ip(run), nic_wait_s=0.5, sys_class_net=None)


def test_update_interface_sets_mtu_addresses_and_up(netns: str) -> None:
    net = in_netns(netns)
    link = net.update_interface(MAC.upper(), 1400, [network.Address("10.99.0.5", 24)])
    assert link.name == "eth0" and link.mtu == 1400
    assert link.addresses == (network.Address("10.99.0.5", 24),)
    # again with another address: replaced, not added to
    link = net.update_interface(MAC, 1400, [network.Address("10.99.1.5", 24), network.Address("fd00::5", 64, 6)])
    assert set(link.addresses) == {network.Address("10.99.1.5", 24), network.Address("fd00::5", 64, 6)}
    state = subprocess.run(["ip", "netns", "exec", netns, "ip", "-j", "link", "show", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    assert '"UP"' in state


def test_address_changes_keep_the_routes_through_the_nic(netns: str) -> None:
    net = in_netns(netns)
    a, b = network.Address("10.99.0.5", 24), network.Address("10.99.1.5", 24)
    net.update_interface(MAC, 0, [a])
    net.update_routes([network.Route("", gateway="10.99.0.1", device="eth0")])
    # an address added or removed beside the gateway's: the default route stays (no flush)
    assert set(net.update_interface(MAC, 0, [a, b]).addresses) == {a, b}
    assert ("", "10.99.0.1") in {(r.dest, r.gateway) for r in net.routes()}
    assert net.update_interface(MAC, 0, [a]).addresses == (a,)
    assert ("", "10.99.0.1") in {(r.dest, r.gateway) for r in net.routes()}


def test_update_interface_unknown_mac_is_not_found(netns: str) -> None:
    with pytest.raises(NotFound):
        in_netns(netns).update_interface("02:00:00:00:00:99", 0, [])


def test_update_routes_replaces_the_table_keeping_connected_routes(netns: str) -> None:
    net = in_netns(netns)
    net.update_interface(MAC, 0, [network.Address("10.99.0.5", 24)])
    connected = network.Route("10.99.0.0/24", device="eth0", source="10.99.0.5", scope=network.RT_SCOPE_LINK)
    table = net.update_routes([connected, network.Route("", gateway="10.99.0.1", device="eth0"),
                               network.Route("10.98.0.0/16", gateway="10.99.0.254", device="eth0")])
    assert {(r.dest, r.gateway) for r in table} == {("10.99.0.0/24", ""), ("", "10.99.0.1"),
                                                   ("10.98.0.0/16", "10.99.0.254")}
    table = net.update_routes([connected])  # the default and the /16 go, the connected route stays
    assert [(r.dest, r.gateway) for r in table] == [("10.99.0.0/24", "")]


def test_arp_neighbors_are_permanent(netns: str) -> None:
    net = in_netns(netns)
    net.update_interface(MAC, 0, [network.Address("10.99.0.5", 24)])
    net.add_neighbors([network.Neighbor("10.99.0.7", "eth0", "02:00:00:00:00:07")])
    out = subprocess.run(["ip", "netns", "exec", netns, "ip", "neigh", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    assert "10.99.0.7 lladdr 02:00:00:00:00:07 PERMANENT" in out
    with pytest.raises(InvalidArgument):
        net.add_neighbors([network.Neighbor("10.99.0.8", "eth0", "")])


def test_ipv6_default_route_is_added_and_removed_in_a_batch(netns: str) -> None:
    # `ip -batch` lines take no -6: the IPv6 default route must still be told apart from IPv4's
    net = in_netns(netns)
    net.update_interface(MAC, 0, [network.Address("10.99.0.5", 24), network.Address("fd00::5", 64, 6)])
    v4_default = network.Route("", gateway="10.99.0.1", device="eth0")
    v6_default = network.Route("", gateway="fd00::1", device="eth0", family=6)
    table = net.update_routes([v4_default, v6_default])
    defaults = {(r.family, r.gateway) for r in table if not r.dest}
    assert defaults == {(4, "10.99.0.1"), (6, "fd00::1")}
    table = net.update_routes([v4_default])  # only the IPv6 default goes
    assert {(r.family, r.gateway) for r in table if not r.dest} == {(4, "10.99.0.1")}
