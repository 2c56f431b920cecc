"""Netlink work inside the pod's netns (pyroute2): dump it, join a veth to a new tap with tc, and
open a socket that hears the netns change.

Every function here runs in the netns through `run_in_netns` and blocks: call them from a worker
thread (trio.to_thread.run_sync).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shim.network.netns import run_in_netns

# pyroute2 logs every netlink message at debug level; the netns is dumped after every change
logging.getLogger("pyroute2").setLevel(logging.WARNING)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
ETH_P_ALL = 0x0003
INGRESS = "ffff:"
# rtnetlink multicast groups (legacy bind mask): links, IPv4/IPv6 addresses and routes. Neighbours
# are left out: learnt ARP entries change state all the time and only static ones are mirrored.
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
MONITOR_GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE


@dataclass(frozen=True)
class Dump:
    links: list[dict[str, Any]]
    addrs: list[dict[str, Any]]
    routes: list[dict[str, Any]]
    neighbors: list[dict[str, Any]]


def dump(netns: str) -> Dump:
    """Links, addresses, routes and neighbours of the netns as plain records (see translate.py)."""
    def work() -> Dump:
        with IPRoute() as ipr:
            links = [{"index": m["index"], "ifname": m.get("ifname"), "address": m.get("address"),
                      "mtu": m.get("mtu")} for m in ipr.get_links()]
            addrs = [{"index": m["index"], "family": m["family"], "prefixlen": m["prefixlen"],
                      "scope": m["scope"], "address": m.get("local") or m.get("address")}
                     for m in ipr.get_addr()]
            routes = []
            for af in (socket.AF_INET, socket.AF_INET6):
                for m in ipr.get_routes(family=af):
                    routes.append({"family": m["family"], "dst": m.get("dst"), "dst_len": m["dst_len"],
                                   "gateway": m.get("gateway"), "oif": m.get("oif"), "prefsrc": m.get("prefsrc"),
                                   "scope": m["scope"], "table": m.get("table") or m["table"], "type": m["type"]})
            neighbors = [{"ifindex": m["ifindex"], "family": m["family"], "dst": m.get("dst"),
                          "lladdr": m.get("lladdr"), "state": m["state"]} for m in ipr.get_neighbours()]
        return Dump(links, addrs, routes, neighbors)
    return _netlink(netns, work)


def monitor(netns: str) -> socket.socket:
    """A non-blocking rtnetlink socket of the netns, subscribed to link/address/route changes (ours
    to close). A socket stays in the netns it was made in, so trio can wait on it from any thread."""
    def work() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            sock.bind((0, MONITOR_GROUPS))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock
    return _netlink(netns, work)


def _netlink(netns: str, work: Any) -> Any:
    """run_in_netns with netlink errors as OSError (what the sandbox's start handles)."""
    try:
        return run_in_netns(netns, work)
    except NetlinkError as exc:
        raise OSError(exc.code, f"netns {netns}: netlink: {exc}") from exc


def attach_tap(netns: str, veth_index: int, tap: str, mtu: int) -> int:
    """Create tap ``tap`` in the netns and redirect all traffic veth <-> tap (ingress qdisc + u32
    match-all + mirred egress redirect, both ways). Returns the tap's fd (ours to close; the tap,
    not persistent, disappears once QEMU and we have closed it)."""
    def work() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            with IPRoute() as ipr:
                tap_index = ipr.link_lookup(ifname=tap)[0]
                ipr.link("set", index=tap_index, mtu=mtu or 1500, state="up")
                for src, dst in ((veth_index, tap_index), (tap_index, veth_index)):
                    ipr.tc("add", "ingress", src, INGRESS)
                    ipr.tc("add-filter", "u32", src, parent=INGRESS, protocol=ETH_P_ALL, keys=["0x0/0x0+0"],
                           target=0x10000, action={"kind": "mirred", "direction": "egress",
                                                   "action": "redirect", "ifindex": dst})
        except BaseException:
            os.close(fd)
            _detach(veth_index, tap)
            raise
        return fd
    return _netlink(netns, work)


def detach_tap(netns: str, veth_index: int, tap: str) -> None:
    """Remove the redirect from the veth and the tap if it is still there. Idempotent; a vanished
    netns is fine."""
    if not os.path.exists(netns):
        return
    _netlink(netns, lambda: _detach(veth_index, tap))


def _detach(veth_index: int, tap: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.tc("del", "ingress", veth_index, INGRESS)
        except NetlinkError:
            pass  # never added, or the veth is gone
        for index in ipr.link_lookup(ifname=tap):
            try:
                ipr.link("del", index=index)
            except NetlinkError:
                pass
