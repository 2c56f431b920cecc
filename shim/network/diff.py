"""Pure: what must change in the guest so it matches the pod's netns again.

The host keeps what it last applied (one `Mirrored` per veth, the routes and the static neighbours it
sent); after each change in the netns it compares that with a fresh dump, already translated by
`translate.py`. Interfaces are compared first (their guest names are only known once a new NIC is
configured); routes and neighbours are compared afterwards, with every guest name known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent_client.protocol import ArpNeighbor, Route
from shim.network.translate import Endpoint


@dataclass(frozen=True)
class Mirrored:
    """A veth mirrored into the guest: its tap, the hot-plugged NIC and the guest's name for it."""

    endpoint: Endpoint
    tap: str
    nic_id: str
    guest_name: str


@dataclass(frozen=True)
class LinkChanges:
    remove: tuple[Mirrored, ...] = ()
    add: tuple[Endpoint, ...] = ()
    update: tuple[tuple[Mirrored, Endpoint], ...] = ()  # same NIC, new addresses or MTU

    def __bool__(self) -> bool:
        return bool(self.remove or self.add or self.update)


def links(applied: Mapping[int, Mirrored], wanted: Sequence[Endpoint]) -> LinkChanges:
    """Which NICs go, come or need new settings.

    A veth is the same one while its netns index and MAC stay; a new MAC on the same index means a
    new guest NIC (the agent finds NICs by MAC), so the old one goes and a new one comes.
    """
    by_index = {ep.index: ep for ep in wanted}
    remove, update = [], []
    for index, m in sorted(applied.items()):
        ep = by_index.get(index)
        if ep is None or ep.interface.hw_addr != m.endpoint.interface.hw_addr:
            remove.append(m)
        elif (set(ep.interface.addresses) != set(m.endpoint.interface.addresses)
              or ep.interface.mtu != m.endpoint.interface.mtu):
            update.append((m, ep))
    kept = {m.endpoint.index for m in applied.values()} - {m.endpoint.index for m in remove}
    add = [ep for ep in wanted if ep.index not in kept]
    return LinkChanges(tuple(remove), tuple(add), tuple(update))


def routes(applied: Iterable[Route], wanted: Sequence[Route]) -> list[Route] | None:
    """The full set to send (UpdateRoutes replaces the table), or None when nothing changed."""
    return None if set(applied) == set(wanted) else list(wanted)


def neighbors(applied: Iterable[ArpNeighbor], wanted: Iterable[ArpNeighbor]) -> list[ArpNeighbor]:
    """Static neighbours the guest has not been given yet (AddARPNeighbors only adds)."""
    seen = set(applied)
    return [n for n in wanted if n not in seen]
