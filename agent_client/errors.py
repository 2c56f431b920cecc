"""Errors raised by every `Agent` implementation.

One root class; each subclass stands for one gRPC status class the agent can return, so the shim can map
them to its own closed error set without knowing about gRPC. Each error carries the agent's message
(sanitised: the guest is untrusted) and the RPC that failed.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error an `Agent` raises."""

    def __init__(self, message: str, *, method: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.method = method

    def __str__(self) -> str:
        return f"agent {self.method}: {self.message}" if self.method else f"agent: {self.message}"


class AgentNotFound(AgentError):
    """The container, process or sandbox named does not exist in the guest."""


class AgentAlreadyExists(AgentError):
    """The container or exec id is already in use."""


class AgentInvalidArgument(AgentError):
    """The agent rejected the request (bad spec, path outside its directory, ...)."""


class AgentFailedPrecondition(AgentError):
    """The object is in the wrong state for the call (e.g. starting a running container)."""


class AgentUnimplemented(AgentError):
    """The agent does not implement this RPC (older guest image)."""


class AgentUnavailable(AgentError):
    """The channel to the agent is dead, closed, or was never established."""


class AgentTimeout(AgentError):
    """The call's deadline passed before the agent answered."""


class AgentInternal(AgentError):
    """The agent failed for a reason of its own, or answered with something we refuse to believe."""


class AgentBadResponse(AgentInternal):
    """The guest answered with a value outside what the protocol allows (the guest is untrusted)."""
