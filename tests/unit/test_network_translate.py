"""Netlink dump records → agent messages (shim/network/translate.py), and the netns path of a spec."""

from __future__ import annotations

import socket

from agent_client.protocol import ArpNeighbor, Interface, IPAddress, Route
from shim.network import netns_path
from shim.network.translate import endpoints, neighbors, routes

LINKS = [
    {"index": 1, "ifname": "lo", "address": "00:00:00:00:00:00", "mtu": 65536},
    {"index": 2, "ifname": "eth0", "address": "AA:BB:CC:00:00:01", "mtu": 1450},
    {"index": 3, "ifname": "tap0_kata", "address": "02:00:00:00:00:09", "mtu": 1450},
]
ADDRS = [
    {"index": 1, "family": socket.AF_INET, "prefixlen": 8, "scope": 254, "address": "127.0.0.1"},
    {"index": 2, "family": socket.AF_INET, "prefixlen": 24, "scope": 0, "address": "10.99.0.10"},
    {"index": 2, "family": socket.AF_INET6, "prefixlen": 64, "scope": 0, "address": "fd00::10"},
    {"index": 2, "family": socket.AF_INET6, "prefixlen": 64, "scope": 253, "address": "fe80::1"},
]


def test_endpoints_skip_loopback_and_taps_and_link_local() -> None:
    [ep] = endpoints(LINKS, ADDRS)
    assert ep.index == 2 and ep.name == "eth0" and ep.tap_name(0) == "tap0_kata"
    assert ep.interface == Interface("eth0", "aa:bb:cc:00:00:01", 1450,
                                     (IPAddress("10.99.0.10", 24), IPAddress("fd00::10", 64, 6)))


def test_routes_keep_main_unicast_through_mirrored_links_named_as_the_guest_does() -> None:
    records = [
        {"family": socket.AF_INET, "dst": None, "dst_len": 0, "gateway": "10.99.0.1", "oif": 2, "scope": 0,
         "table": 254, "type": 1},
        {"family": socket.AF_INET, "dst": "10.99.0.0", "dst_len": 24, "oif": 2, "prefsrc": "10.99.0.10",
         "scope": 253, "table": 254, "type": 1},
        {"family": socket.AF_INET, "dst": "127.0.0.0", "dst_len": 8, "oif": 1, "scope": 254, "table": 255,
         "type": 2},  # local table
        {"family": socket.AF_INET, "dst": "10.1.0.0", "dst_len": 16, "oif": 3, "table": 254, "type": 1},  # tap
        {"family": socket.AF_INET6, "dst": "fe80::", "dst_len": 64, "oif": 2, "table": 254, "type": 1},
        {"family": socket.AF_INET6, "dst": "fd00::", "dst_len": 64, "oif": 2, "table": 254, "type": 1},
    ]
    assert routes(records, {2: "ens2"}) == [
        Route("", gateway="10.99.0.1", device="ens2"),
        Route("10.99.0.0/24", device="ens2", source="10.99.0.10", scope=253),
        Route("fd00::/64", device="ens2", family=6),
    ]


def test_only_permanent_neighbours_are_sent() -> None:
    records = [
        {"ifindex": 2, "family": socket.AF_INET, "dst": "10.99.0.7", "lladdr": "AA:00:00:00:00:07", "state": 0x80},
        {"ifindex": 2, "family": socket.AF_INET, "dst": "10.99.0.8", "lladdr": "aa:00:00:00:00:08", "state": 0x02},
        {"ifindex": 1, "family": socket.AF_INET, "dst": "10.0.0.1", "lladdr": "aa:00:00:00:00:01", "state": 0x80},
    ]
    assert neighbors(records, {2: "eth0"}) == [ArpNeighbor("10.99.0.7", "eth0", "aa:00:00:00:00:07")]


def test_netns_path_from_spec() -> None:
    ns = {"type": "network", "path": "/var/run/netns/cni-1"}
    assert netns_path({"linux": {"namespaces": [{"type": "pid"}, ns]}}) == "/var/run/netns/cni-1"
    assert netns_path({"linux": {"namespaces": [{"type": "network"}]}}) is None  # a new, empty netns
    assert netns_path({}) is None
