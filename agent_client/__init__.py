"""Host side of the agent protocol: the `Agent` interface, its grpc implementation, transports, a fake."""

from agent_client.errors import (
    AgentAlreadyExists,
    AgentBadResponse,
    AgentError,
    AgentFailedPrecondition,
    AgentInternal,
    AgentInvalidArgument,
    AgentNotFound,
    AgentTimeout,
    AgentUnavailable,
    AgentUnimplemented,
)
from agent_client.protocol import (
    Agent,
    AgentVersion,
    ContainerStats,
    CpuStats,
    GuestDetails,
    MemoryStats,
    OnlineResources,
    PidsStats,
    Storage,
)

__all__ = [
    "Agent",
    "AgentAlreadyExists",
    "AgentBadResponse",
    "AgentError",
    "AgentFailedPrecondition",
    "AgentInternal",
    "AgentInvalidArgument",
    "AgentNotFound",
    "AgentTimeout",
    "AgentUnavailable",
    "AgentUnimplemented",
    "AgentVersion",
    "ContainerStats",
    "CpuStats",
    "GuestDetails",
    "MemoryStats",
    "OnlineResources",
    "PidsStats",
    "Storage",
]
