"""Guest network configuration: UpdateInterface, UpdateRoutes, AddARPNeighbors, ListInterfaces,
ListRoutes, with iproute2's `ip` (JSON output) — the guest has no pyroute2.

The host mirrors the pod's network namespace: it hot-plugs a NIC whose MAC is the pod veth's MAC,
then asks for that NIC's addresses and MTU, the routes and the static neighbours. The NIC keeps the
guest kernel's name (eth0, ...); the host learns it from UpdateInterface's answer. Parsing is pure
(`parse_*`) so it can be tested on the host; `Ip` runs the commands (in a netns in tests).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import InvalidArgument, NotFound

NIC_WAIT_S = 30.0  # a hot-plugged NIC takes a moment to show up under TCG
RT_SCOPE_LINK = 253


@dataclass(frozen=True)
class Address:
    address: str
    prefix_len: int
    family: int = 4


@dataclass(frozen=True)
class Link:
    name: str
    mac: str
    mtu: int
    addresses: tuple[Address, ...] = ()


@dataclass(frozen=True)
class Route:
    dest: str  # CIDR, or "" for default
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0
    family: int = 4
    protocol: str = field(default="", compare=False)


@dataclass(frozen=True)
class Neighbor:
    ip: str
    device: str
    lladdr: str


def parse_links(doc: list[dict[str, Any]]) -> list[Link]:
    """`ip -j addr show` → links (loopback and non-ethernet links left out)."""
    links = []
    for item in doc:
        if item.get("link_type") != "ether":
            continue
        addrs = tuple(Address(a["local"], int(a["prefixlen"]), 6 if a.get("family") == "inet6" else 4)
                      for a in item.get("addr_info", [])
                      if a.get("family") in ("inet", "inet6") and a.get("scope") != "link")
        links.append(Link(item["ifname"], item.get("address", "").lower(), int(item.get("mtu", 0)), addrs))
    return links


_SCOPES = {"global": 0, "universe": 0, "site": 200, "link": RT_SCOPE_LINK, "host": 254}


def parse_routes(doc: list[dict[str, Any]], family: int) -> list[Route]:
    """`ip -j [-6] route show` → routes (multicast/link-local IPv6 and unreachable left out)."""
    routes = []
    for r in doc:
        dst = r.get("dst", "")
        if r.get("type", "unicast") != "unicast" or dst.startswith(("fe80:", "ff00:", "multicast")):
            continue
        routes.append(Route(dest="" if dst == "default" else dst, gateway=r.get("gateway", ""),
                            device=r.get("dev", ""), source=r.get("prefsrc", ""),
                            scope=_SCOPES.get(r.get("scope", "global"), 0), family=family,
                            protocol=str(r.get("protocol", ""))))
    return routes


def route_args(r: Route) -> list[str]:
    """The `ip route` arguments that describe ``r``."""
    args = ["-6"] if r.family == 6 else []
    args += ["route", "replace", r.dest or "default"]
    if r.gateway:
        args += ["via", r.gateway]
    if r.device:
        args += ["dev", r.device]
    if r.source:
        args += ["src", r.source]
    if r.scope:
        args += ["scope", {v: k for k, v in _SCOPES.items()}.get(r.scope, str(r.scope))]
    return args


def _batch_dest(r: Route) -> str:
    """A route's destination as an `ip -batch` line names it: no -6 there, so an IPv6 default route
    is ::/0 (other destinations and gateways carry their family)."""
    return r.dest or ("::/0" if r.family == 6 else "default")


def _batch_route_args(r: Route) -> list[str]:
    args = route_args(r)
    if args[0] == "-6":
        args = args[1:]
    return [_batch_dest(r) if a == "default" else a for a in args]


def plan_routes(current: Sequence[Route], wanted: Sequence[Route]) -> tuple[list[Route], list[Route]]:
    """(to add, to delete) so the table holds `wanted`.

    Routes the kernel made for connected subnets stay (and are not added again); gatewayless routes
    go first so every gateway is reachable when its route is added.
    """
    kernel = {r for r in current if r.protocol == "kernel"}
    add = sorted((r for r in wanted if _key(r) not in {_key(k) for k in kernel}), key=lambda r: bool(r.gateway))
    wanted_keys = {_key(r) for r in wanted}
    delete = [r for r in current if r.protocol != "kernel" and _key(r) not in wanted_keys]
    return add, delete


def plan_addresses(current: Sequence[Address], wanted: Sequence[Address]) -> tuple[list[Address], list[Address]]:
    """(to delete, to add) so the link holds exactly `wanted` (link-local ones are not listed)."""
    return [a for a in current if a not in wanted], [a for a in wanted if a not in current]


def _key(r: Route) -> tuple[str, str, int]:
    return (r.dest, r.device, r.family)


_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_BATCH_TOKEN = re.compile(r"[^\s\"'\\#]+")  # no blanks, quotes, escapes or comments


class Ip:
    """Runs `ip`; raises InvalidArgument with its stderr when a command fails."""

    def __init__(self, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> None:
        self._run = run

    def __call__(self, *args: str) -> str:
        proc = self._run(["ip", *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise InvalidArgument(f"ip {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def json(self, *args: str) -> list[dict[str, Any]]:
        return json.loads(self("-j", *args) or "[]")

    def batch(self, commands: Sequence[Sequence[str]]) -> None:
        """Run several `ip` commands in one process (`ip -batch -`): every exec of `ip` costs
        ~0.1 s in a TCG guest. Stops at the first failing command; raises InvalidArgument then."""
        if not commands:
            return
        for command in commands:  # a batch line is split on blanks: a token must not make two
            bad = next((t for t in command if not _BATCH_TOKEN.fullmatch(t)), None)
            if bad is not None:
                raise InvalidArgument(f"ip: {bad!r} is not a valid argument")
        script = "".join(" ".join(command) + "\n" for command in commands)
        proc = self._run(["ip", "-batch", "-"], input=script, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise InvalidArgument(f"ip -batch: {proc.stderr.strip()}")


def macs_in_sysfs(sys_class_net: str) -> set[str]:
    """The MAC addresses of this namespace's links, from sysfs (no process: a `ip` exec costs ~0.1 s
    of the guest's only vCPU, which a NIC being hot-plugged needs)."""
    found: set[str] = set()
    try:
        names = os.listdir(sys_class_net)
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(sys_class_net, name, "address")) as f:
                found.add(f.read().strip().lower())
        except OSError:
            continue  # went away meanwhile, or no address
    return found


class Network:
    def __init__(self, ip: Ip | None = None, nic_wait_s: float = NIC_WAIT_S,
                 sys_class_net: str | None = "/sys/class/net") -> None:
        """`sys_class_net`: where to watch for a NIC to appear before asking `ip` about it; None
        asks `ip` every time (tests run `ip` in another network namespace than their sysfs)."""
        self.ip = ip or Ip()
        self.nic_wait_s = nic_wait_s
        self.sys_class_net = sys_class_net

    def links(self) -> list[Link]:
        return parse_links(self.ip.json("addr", "show"))

    def routes(self) -> list[Route]:
        return parse_routes(self.ip.json("route", "show"), 4) + parse_routes(self.ip.json("-6", "route", "show"), 6)

    def _find(self, mac: str) -> Link:
        deadline = time.monotonic() + self.nic_wait_s
        while True:
            if self.sys_class_net is None or mac.lower() in macs_in_sysfs(self.sys_class_net):
                link = next((x for x in self.links() if x.mac == mac.lower()), None)
                if link is not None:
                    return link
            if time.monotonic() > deadline:
                raise NotFound(f"no network interface with MAC {mac} after {self.nic_wait_s:.0f} s")
            time.sleep(0.1)

    def update_interface(self, mac: str, mtu: int, addresses: Sequence[Address]) -> Link:
        if not _MAC.fullmatch(mac or ""):
            raise InvalidArgument(f"interface.hw_addr: {mac!r} is not a MAC address")
        link = self._find(mac)
        commands = [["link", "set", "dev", "lo", "up"]]
        if mtu:
            commands.append(["link", "set", "dev", link.name, "mtu", str(mtu)])
        # only the difference: a flush would drop every route through the NIC (the default route
        # too) until the host sends the routes again
        remove, add = plan_addresses(link.addresses, addresses)
        for verb, todo in (("del", remove), ("add", add)):
            for a in todo:
                # (no -6 in a batch: the family follows from the address)
                commands.append(["addr", verb, f"{a.address}/{a.prefix_len}", "dev", link.name])
        commands.append(["link", "set", "dev", link.name, "up"])
        self.ip.batch(commands)
        return self._find(mac)

    def update_routes(self, wanted: Sequence[Route]) -> list[Route]:
        add, delete = plan_routes(self.routes(), wanted)
        self.ip.batch([["route", "del", _batch_dest(r), *(["dev", r.device] if r.device else [])] for r in delete]
                      + [_batch_route_args(r) for r in add])
        return self.routes()

    def add_neighbors(self, neighbors: Sequence[Neighbor]) -> None:
        for n in neighbors:
            if not (n.ip and n.device and n.lladdr):
                raise InvalidArgument(f"ARP neighbour needs ip, device and lladdr: {n}")
        self.ip.batch([["neigh", "replace", n.ip, "lladdr", n.lladdr, "dev", n.device, "nud", "permanent"]
                       for n in neighbors])
