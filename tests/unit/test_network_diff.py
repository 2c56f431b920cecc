"""What must change in the guest when the pod's netns changed (shim/network/diff.py)."""

from __future__ import annotations

from agent_client.protocol import ArpNeighbor, Interface, IPAddress, Route
from shim.network import diff
from shim.network.diff import LinkChanges, Mirrored
from shim.network.translate import Endpoint

A = IPAddress("10.99.0.10", 24)
B = IPAddress("10.99.1.20", 24)


def ep(index: int, mac: str, *addrs: IPAddress, mtu: int = 1500, name: str = "") -> Endpoint:
    name = name or f"eth{index}"
    return Endpoint(index, name, Interface(name, mac, mtu, addrs))


def mirrored(e: Endpoint, n: int = 0) -> Mirrored:
    return Mirrored(e, f"tap{n}_kata", f"nic{n}", f"guest{n}")


def test_nothing_applied_yet_everything_is_added() -> None:
    wanted = [ep(2, "aa:00:00:00:00:02", A), ep(5, "aa:00:00:00:00:05")]
    assert diff.links({}, wanted) == LinkChanges(add=tuple(wanted))


def test_unchanged_netns_means_no_changes() -> None:
    e = ep(2, "aa:00:00:00:00:02", A, B)
    same_in_other_order = ep(2, "aa:00:00:00:00:02", B, A)
    changes = diff.links({2: mirrored(e)}, [same_in_other_order])
    assert not changes and changes == LinkChanges()


def test_address_or_mtu_change_updates_the_same_nic() -> None:
    old = mirrored(ep(2, "aa:00:00:00:00:02", A))
    with_b = ep(2, "aa:00:00:00:00:02", A, B)
    assert diff.links({2: old}, [with_b]) == LinkChanges(update=((old, with_b),))
    bigger = ep(2, "aa:00:00:00:00:02", A, mtu=9000)
    assert diff.links({2: old}, [bigger]) == LinkChanges(update=((old, bigger),))
    no_addresses = ep(2, "aa:00:00:00:00:02")
    assert diff.links({2: old}, [no_addresses]) == LinkChanges(update=((old, no_addresses),))


def test_new_and_gone_veths() -> None:
    first, second = mirrored(ep(2, "aa:00:00:00:00:02", A)), mirrored(ep(7, "aa:00:00:00:00:07"), 1)
    third = ep(9, "aa:00:00:00:00:09", B)
    changes = diff.links({2: first, 7: second}, [first.endpoint, third])
    assert changes == LinkChanges(remove=(second,), add=(third,))


def test_new_mac_on_the_same_index_replaces_the_nic() -> None:
    # the agent finds the guest NIC by MAC: a new MAC needs a new NIC
    old = mirrored(ep(2, "aa:00:00:00:00:02", A))
    new = ep(2, "aa:00:00:00:00:22", A)
    assert diff.links({2: old}, [new]) == LinkChanges(remove=(old,), add=(new,))


def test_routes_are_sent_whole_and_only_when_the_set_changed() -> None:
    default = Route("", gateway="10.99.0.1", device="eth0")
    connected = Route("10.99.0.0/24", device="eth0", source="10.99.0.10", scope=253)
    extra = Route("10.98.0.0/16", gateway="10.99.0.1", device="eth0")
    assert diff.routes([default, connected], [connected, default]) is None
    assert diff.routes([default, connected], [default, connected, extra]) == [default, connected, extra]
    assert diff.routes([default, connected, extra], [default, connected]) == [default, connected]
    assert diff.routes([], []) is None
    assert diff.routes([default], []) == []  # every NIC gone: the guest table is emptied too


def test_only_new_static_neighbours_are_added() -> None:
    n1 = ArpNeighbor("10.99.0.7", "eth0", "aa:00:00:00:00:07")
    n2 = ArpNeighbor("10.99.0.8", "eth0", "aa:00:00:00:00:08")
    assert diff.neighbors([n1], [n1, n2]) == [n2]
    assert diff.neighbors([n1, n2], [n1]) == []
