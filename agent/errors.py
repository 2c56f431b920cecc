"""The agent's closed set of errors; `server.py` maps each class to one gRPC status code."""


class AgentError(Exception):
    """Base class: every error the agent reports to the host."""


class NotFound(AgentError):
    """The named container or process does not exist (or has already finished)."""


class AlreadyExists(AgentError):
    """A container or process with that id already exists."""


class FailedPrecondition(AgentError):
    """The object exists but is in the wrong state for the request."""


class InvalidArgument(AgentError):
    """The request is malformed: a bad id, path, JSON document or option."""


class Unimplemented(AgentError):
    """The request is valid but this agent does not implement it."""


class Internal(AgentError):
    """Something in the guest failed (a runtime command, a mount, a syscall)."""
