"""shim/network/host.py in a throw-away netns: dump, tap + tc mirred both ways, detach leaves nothing."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from shim.network import host, translate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpnet-h{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip = ["ip", "-n", name]
        subprocess.run([*ip, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True)
        subprocess.run([*ip, "addr", "add", "10.99.0.10/24", "dev", "eth0"], check=True)
        subprocess.run([*ip, "link", "set", "eth0", "up"], check=True)
        subprocess.run([*ip, "link", "set", "peer0", "up"], check=True)
        subprocess.run([*ip, "route", "add", "default", "via", "10.99.0.1"], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def tc(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", os.path.basename(netns), "tc", *args],
                          capture_output=True, text=True, check=True).stdout


def test_dump_attach_detach(netns: str) -> None:
    dump = host.dump(netns)
    eps = [e for e in translate.endpoints(dump.links, dump.addrs) if e.name == "eth0"]
    [ep] = eps
    assert [(a.address, a.prefix_len) for a in ep.interface.addresses] == [("10.99.0.10", 24)]
    routes = translate.routes(dump.routes, {ep.index: "eth0"})
    assert ("", "10.99.0.1") in [(r.dest, r.gateway) for r in routes]

    fd = host.attach_tap(netns, ep.index, "tap0_kata", 1500)
    try:
        filters = tc(netns, "filter", "show", "dev", "eth0", "ingress")
        assert "mirred (Egress Redirect to device tap0_kata)" in filters
        assert "Redirect to device eth0" in tc(netns, "filter", "show", "dev", "tap0_kata", "ingress")
    finally:
        os.close(fd)
    host.detach_tap(netns, ep.index, "tap0_kata")
    host.detach_tap(netns, ep.index, "tap0_kata")  # idempotent
    assert "ingress" not in tc(netns, "qdisc", "show")
    links = subprocess.run(["ip", "-n", os.path.basename(netns), "link"], capture_output=True, text=True).stdout
    assert "tap0_kata" not in links
