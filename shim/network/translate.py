"""Pure translation of a netns's netlink dump (plain records) into what the agent is told.

Records are the dicts `host.dump()` builds from pyroute2 messages, so tests can write them by hand:
link {index, ifname, address, mtu, kind}, addr {index, family, address, prefixlen, scope},
route {family, dst, dst_len, gateway, oif, prefsrc, scope, table, type},
neigh {ifindex, family, dst, lladdr, state}.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent_client.protocol import ArpNeighbor, Interface, IPAddress, Route

TAP_SUFFIX = "_kata"
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
NUD_PERMANENT = 0x80
RT_SCOPE_HOST = 254
Record = Mapping[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """One pod interface to mirror: the netns link and what the guest NIC must look like."""

    index: int
    name: str
    interface: Interface

    def tap_name(self, n: int) -> str:
        return f"tap{n}{TAP_SUFFIX}"


def _family(af: int) -> int:
    return 6 if af == socket.AF_INET6 else 4


def endpoints(links: Iterable[Record], addrs: Iterable[Record]) -> list[Endpoint]:
    """Links worth a guest NIC: anything with a MAC except loopback and our own taps."""
    addrs = list(addrs)
    out = []
    for link in sorted(links, key=lambda r: r["index"]):
        name, mac = link.get("ifname", ""), (link.get("address") or "").lower()
        if name == "lo" or name.endswith(TAP_SUFFIX) or not mac or mac == "00:00:00:00:00:00":
            continue
        ips = tuple(IPAddress(a["address"], int(a["prefixlen"]), _family(a["family"]))
                    for a in addrs
                    if a["index"] == link["index"] and a.get("scope", 0) != 253  # link-local (fe80::)
                    and a["family"] in (socket.AF_INET, socket.AF_INET6))
        out.append(Endpoint(link["index"], name, Interface(name=name, hw_addr=mac, mtu=int(link.get("mtu") or 0),
                                                            addresses=ips)))
    return out


def routes(records: Iterable[Record], guest_names: Mapping[int, str]) -> list[Route]:
    """Main-table unicast routes through mirrored links, device named as the guest calls it."""
    out = []
    for r in records:
        oif = r.get("oif")
        if (r.get("table", RT_TABLE_MAIN) != RT_TABLE_MAIN or r.get("type", RTN_UNICAST) != RTN_UNICAST
                or not isinstance(oif, int) or oif not in guest_names or r.get("scope", 0) == RT_SCOPE_HOST):
            continue
        family = _family(r["family"])
        dst, dst_len = r.get("dst") or "", int(r.get("dst_len") or 0)
        if family == 6 and (dst.startswith("fe80:") or dst.startswith("ff")):
            continue
        out.append(Route(dest=f"{dst}/{dst_len}" if dst_len else "", gateway=r.get("gateway") or "",
                         device=guest_names[oif], source=r.get("prefsrc") or "", scope=int(r.get("scope", 0)),
                         family=family))
    return out


def neighbors(records: Iterable[Record], guest_names: Mapping[int, str]) -> list[ArpNeighbor]:
    """Static (permanent) neighbours on mirrored links; learnt ones the guest learns itself."""
    return [ArpNeighbor(ip=n["dst"], device=guest_names[n["ifindex"]], lladdr=n["lladdr"].lower(),
                        family=_family(n["family"]))
            for n in records
            if n.get("ifindex") in guest_names and n.get("state", 0) & NUD_PERMANENT and n.get("lladdr")
            and n.get("dst")]
