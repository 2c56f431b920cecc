"""Guest network configuration (UpdateInterface, UpdateRoutes, AddARPNeighbors, ListInterfaces,
ListRoutes).

Not implemented in this version of the agent: the server answers these RPCs with UNIMPLEMENTED, and
containers use the VM's own network namespace as it is configured at boot. This module is where the
netlink implementation belongs when the pod network is mirrored into the guest.
"""

from agent.errors import Unimplemented


def unimplemented(rpc: str) -> Unimplemented:
    """The error every network RPC returns for now."""
    return Unimplemented(f"{rpc}: guest network configuration is not implemented by this agent")
