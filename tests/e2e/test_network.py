"""Pod networking end to end (issue #7): two kata-py VMs in two netns on one bridge reach each other,
and what changes in a pod's netns after start follows into its VM.

The tests build the network themselves (a bridge in the host netns, a veth into each `kpnet-*` netns,
10.99.0.0/24 with no address on the host side, so the traffic stays between the netns), and check
that no tap, qdisc or QEMU is left.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.support import owned
from tests.support.containerd import RUNTIME, PrivateContainerd
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.vm]


def ip(*args: str, check: bool = True) -> str:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class PodNet:
    netns: str
    address: str

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.netns}"


@pytest.fixture
def two_netns() -> Iterator[tuple[PodNet, PodNet]]:
    tag = owned.test_name("")  # the run's tag + a counter: the leak check knows them
    bridge = f"kpbr{tag}"
    pods = (PodNet(f"kpnet-{tag}-a", "10.99.0.10"), PodNet(f"kpnet-{tag}-b", "10.99.0.11"))
    try:
        # bridged frames skip iptables (this host has bridge-nf-call-iptables=1)
        ip("link", "add", bridge, "type", "bridge", "nf_call_iptables", "0")
        ip("link", "set", bridge, "up")
        for n, pod in enumerate(pods):
            host_end = f"kpv{tag}{n}"
            ip("netns", "add", pod.netns)
            ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
            ip("link", "set", host_end, "master", bridge, "up")
            ip("-n", pod.netns, "addr", "add", f"{pod.address}/24", "dev", "eth0")
            ip("-n", pod.netns, "link", "set", "eth0", "up")
            ip("-n", pod.netns, "link", "set", "lo", "up")
            ip("-n", pod.netns, "route", "add", "default", "via", "10.99.0.1")
        yield pods
    finally:
        for n, pod in enumerate(pods):
            ip("link", "del", f"kpv{tag}{n}", check=False)
            ip("netns", "del", pod.netns, check=False)
        ip("link", "del", bridge, check=False)


def netns_state(pod: PodNet) -> str:
    return ip("-n", pod.netns, "link", "show") + subprocess.run(
        ["ip", "netns", "exec", pod.netns, "tc", "qdisc", "show"], capture_output=True, text=True).stdout


def test_two_vms_on_one_bridge_reach_each_other(containerd: PrivateContainerd,
                                                two_netns: tuple[PodNet, PodNet]) -> None:
    server, client = two_netns
    busybox = containerd.import_busybox()
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns", f"network:{server.path}", busybox, "web",
                   "sh", "-c", "while :; do echo hello-over-the-bridge | nc -l -p 8080; done")
    try:
        # while the server runs, its netns holds the tap, with the redirect on the veth
        state = netns_state(server)
        assert "tap0_kata" in state and "ingress" in state, state
        # (busybox-static's wget crashes without glibc's NSS in the image; nc does not)
        script = (f"ip addr show eth0; ip route; for i in $(seq 1 60); do "
                  f"out=$(nc -w 3 {server.address} 8080); echo \"$out\"; "
                  f"case $out in *hello*) exit 0;; esac; sleep 1; done; exit 1")
        result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--with-ns", f"network:{client.path}",
                                busybox, "fetch", "sh", "-c", script, check=False)
        out = result.stdout.decode()
        assert result.returncode == 0, (out, result.stderr.decode(), containerd.log_tail())
        assert "hello-over-the-bridge" in out
        assert f"{client.address}/24" in out  # the guest NIC got the pod's address
        assert "default via 10.99.0.1" in out  # and its routes
        assert "tap0_kata" not in netns_state(client)
    finally:
        containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "web", check=False)
        containerd.ctr("tasks", "delete", "-f", "web", check=False)
        containerd.ctr("containers", "delete", "web", check=False)
    wait_for(lambda: not qemu_pids(containerd), timeout=60, what="QEMU gone")
    for pod in two_netns:
        state = netns_state(pod)
        assert "tap" not in state and "ingress" not in state, state


@pytest.fixture
def one_netns() -> Iterator[PodNet]:
    """A netns whose eth0 (10.99.0.10/24, default via 10.99.0.1) pairs with a veth in the host netns."""
    tag = owned.test_name("")  # the run's tag + a counter: the leak check knows them
    pod = PodNet(f"kpnet-{tag}-f", "10.99.0.10")
    try:
        ip("netns", "add", pod.netns)
        ip("link", "add", f"kpf{tag}", "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        ip("link", "set", f"kpf{tag}", "up")
        ip("-n", pod.netns, "addr", "add", f"{pod.address}/24", "dev", "eth0")
        ip("-n", pod.netns, "link", "set", "eth0", "up")
        ip("-n", pod.netns, "route", "add", "default", "via", "10.99.0.1")
        yield pod
    finally:
        for host_end in (f"kpf{tag}", f"kpg{tag}"):  # kpg: the test's second veth, if it is still there
            ip("link", "del", host_end, check=False)
        ip("netns", "del", pod.netns, check=False)


def test_netns_changes_after_start_follow_into_the_guest(containerd: PrivateContainerd,
                                                         one_netns: PodNet) -> None:
    pod, tag = one_netns, one_netns.netns.split("-")[1]
    busybox = containerd.import_busybox()
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns", f"network:{pod.path}", busybox, "box",
                   "sh", "-c", "while :; do sleep 1; done")
    probes = iter(range(1000))

    def guest_sees(cond: Callable[[str], bool], what: str) -> str:
        def look() -> str | None:
            out = containerd.ctr("tasks", "exec", "--exec-id", f"p{next(probes)}", "box", "sh", "-c",
                                 "ip -o link show; ip -o addr show; echo ---; ip route").stdout.decode()
            return out if cond(out) else None
        return wait_for(look, timeout=90, what=f"the guest sees {what}")

    try:
        guest_sees(lambda out: f"{pod.address}/24" in out, "its first address")
        # an address and a route added to the netns while the pod runs
        ip("-n", pod.netns, "addr", "add", "10.99.1.20/24", "dev", "eth0")
        ip("-n", pod.netns, "route", "add", "10.98.0.0/16", "via", "10.99.0.1")
        out = guest_sees(lambda o: "10.99.1.20/24" in o and "10.98.0.0/16 via 10.99.0.1" in o,
                         "the new address and route")
        assert f"{pod.address}/24" in out and "default via 10.99.0.1" in out
        # a second veth: a new tap and NIC, and its address in the guest
        ip("link", "add", f"kpg{tag}", "type", "veth", "peer", "name", "eth1", "netns", pod.netns)
        ip("-n", pod.netns, "addr", "add", "10.97.0.5/24", "dev", "eth1")
        ip("-n", pod.netns, "link", "set", "eth1", "up")
        out = guest_sees(lambda o: "10.97.0.5/24" in o, "the second interface")
        second = next(line.split()[1] for line in out.splitlines() if "10.97.0.5/24" in line)
        assert "tap1_kata" in netns_state(pod)
        # and all of it removed again: the guest follows
        ip("-n", pod.netns, "route", "del", "10.98.0.0/16")
        ip("-n", pod.netns, "addr", "del", "10.99.1.20/24", "dev", "eth0")
        ip("link", "del", f"kpg{tag}")
        out = guest_sees(lambda o: not any(x in o for x in ("10.99.1.20", "10.98.0.0", "10.97.0.5",
                                                            f": {second}:")), "the removals and the unplug")
        assert f"{pod.address}/24" in out and "default via 10.99.0.1" in out
        state = netns_state(pod)
        assert "tap0_kata" in state and "tap1_kata" not in state, state
    finally:
        containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "box", check=False)
        containerd.ctr("tasks", "delete", "-f", "box", check=False)
        containerd.ctr("containers", "delete", "box", check=False)
    wait_for(lambda: not qemu_pids(containerd), timeout=60, what="QEMU gone")
    state = netns_state(pod)
    assert "tap" not in state and "ingress" not in state, state
