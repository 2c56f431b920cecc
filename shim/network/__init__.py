"""The pod's network: mirror a network namespace (made by CNI or a test) into the VM, Kata's "tcfilter" way.

For each veth in the netns a tap is created next to it and tc mirred redirects join the two; QEMU
gets the tap by fd as a hot-plugged virtio-net NIC with the veth's MAC; the agent gives the guest
NIC the veth's addresses, MTU, routes and static neighbours. `translate` is pure (netlink records →
agent messages), `host` does the netlink work in the netns, `pod` orders the steps.
Import `shim.network.pod` (netlink, pyroute2) only where a pod has a network namespace.
"""

from shim.network.spec import netns_path

__all__ = ["netns_path"]
