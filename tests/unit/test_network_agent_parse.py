"""The agent's pure network parts: `ip -j` output parsing, route arguments and planning, and
waiting for a hot-plugged NIC in sysfs."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from agent import network
from agent.errors import InvalidArgument
from agent.network import (
    Address,
    Link,
    Route,
    macs_in_sysfs,
    parse_links,
    parse_routes,
    plan_addresses,
    plan_routes,
    route_args,
)


def test_parse_links_skips_loopback_and_link_local() -> None:
    doc = [
        {"ifname": "lo", "link_type": "loopback", "address": "00:00:00:00:00:00", "mtu": 65536},
        {"ifname": "eth0", "link_type": "ether", "address": "AA:BB:CC:00:00:01", "mtu": 1450, "addr_info": [
            {"family": "inet", "local": "10.99.0.10", "prefixlen": 24, "scope": "global"},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"}]},
    ]
    assert parse_links(doc) == [Link("eth0", "aa:bb:cc:00:00:01", 1450, (Address("10.99.0.10", 24),))]


def test_parse_routes_and_args() -> None:
    doc = [{"dst": "default", "gateway": "10.99.0.1", "dev": "eth0", "flags": []},
           {"dst": "10.99.0.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link", "prefsrc": "10.99.0.10"},
           {"type": "broadcast", "dst": "10.99.0.255", "dev": "eth0"}]
    default, connected = parse_routes(doc, 4)
    assert default == Route("", gateway="10.99.0.1", device="eth0")
    assert connected == Route("10.99.0.0/24", device="eth0", source="10.99.0.10", scope=network.RT_SCOPE_LINK)
    assert connected.protocol == "kernel"
    assert route_args(default) == ["route", "replace", "default", "via", "10.99.0.1", "dev", "eth0"]
    assert route_args(Route("fd00::/64", device="eth0", family=6)) == ["-6", "route", "replace", "fd00::/64",
                                                                       "dev", "eth0"]


def test_plan_routes_keeps_kernel_routes_and_orders_gateways_last() -> None:
    kernel = Route("10.99.0.0/24", device="eth0", scope=253, protocol="kernel")
    stale = Route("10.5.0.0/16", gateway="10.99.0.9", device="eth0", protocol="boot")
    wanted = [Route("", gateway="10.99.0.1", device="eth0"), Route("10.99.0.0/24", device="eth0", scope=253),
              Route("192.168.0.0/24", device="eth0", scope=253)]
    add, delete = plan_routes([kernel, stale], wanted)
    assert add == [Route("192.168.0.0/24", device="eth0", scope=253), Route("", gateway="10.99.0.1", device="eth0")]
    assert delete == [stale]


def test_plan_addresses_touches_only_the_difference() -> None:
    a, b, c = Address("10.99.0.5", 24), Address("10.99.1.5", 24), Address("fd00::5", 64, 6)
    assert plan_addresses([a, b], [a, c]) == ([b], [c])
    assert plan_addresses([a], [a]) == ([], [])
    assert plan_addresses([a, c], []) == ([a, c], [])


def test_macs_in_sysfs_reads_every_links_address(tmp_path) -> None:
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", "02:AA:00:00:00:01")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    (tmp_path / "gone").mkdir()  # a link that disappeared while being listed
    assert macs_in_sysfs(str(tmp_path)) == {"00:00:00:00:00:00", "02:aa:00:00:00:01"}
    assert macs_in_sysfs(str(tmp_path / "missing")) == set()


def test_a_nic_is_looked_up_with_ip_only_once_sysfs_has_it(tmp_path) -> None:
    calls: list[list[str]] = []

    def run(argv, **_):
        calls.append(argv)
        doc = [{"ifname": "eth0", "link_type": "ether", "address": "02:aa:00:00:00:01", "mtu": 1500}]
        return subprocess.CompletedProcess(argv, 0, json.dumps(doc), "")

    net = network.Network(network.Ip(run), nic_wait_s=5, sys_class_net=str(tmp_path))

    def hotplug() -> None:
        time.sleep(0.3)
        (tmp_path / "eth0").mkdir()
        (tmp_path / "eth0" / "address").write_text("02:aa:00:00:00:01\n")

    threading.Thread(target=hotplug).start()
    assert net._find("02:AA:00:00:00:01").name == "eth0"
    assert len(calls) == 1  # no `ip` while the NIC was still on its way


@pytest.mark.parametrize("bad", ["eth0\nlink set eth0 down", "eth 0", "eth0#", '"eth0"', ""])
def test_a_batch_refuses_arguments_that_would_split_into_more_commands(bad: str) -> None:
    ran: list[str] = []

    def run(argv, input="", **_):  # noqa: A002
        ran.append(input)
        return subprocess.CompletedProcess(argv, 0, "", "")

    ip = network.Ip(run)
    with pytest.raises(InvalidArgument):
        ip.batch([["link", "set", "dev", bad, "up"]])
    ip.batch([["route", "replace", "::/0", "via", "fd00::1", "dev", "eth0"]])
    assert ran == ["route replace ::/0 via fd00::1 dev eth0\n"]
