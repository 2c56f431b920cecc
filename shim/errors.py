"""The closed set of errors the shim raises, and their containerd/gRPC status codes.

Handlers raise these; only the ttrpc boundary turns them into a status (containerd's errdefs.FromGRPC
maps the code back to ErrNotFound etc.), so the mapping lives in exactly one place.
"""

from __future__ import annotations

from ttrpc.errors import Code, StatusError

__all__ = ["AlreadyExists", "Code", "DeadlineExceeded", "FailedPrecondition", "Internal", "InvalidArgument",
           "NotFound", "ShimError", "Unavailable", "Unimplemented"]


class ShimError(StatusError):
    """Root of every error that crosses the Task API boundary with a specific code."""

    code: Code = Code.UNKNOWN
    # containerd's errdefs class suffix; rebaseMessage() strips and re-appends it, so we send it too
    suffix: str = "unknown"

    def __str__(self) -> str:
        msg = super().__str__()
        return msg if msg.endswith(": " + self.suffix) else f"{msg}: {self.suffix}"


class NotFound(ShimError):
    code, suffix = Code.NOT_FOUND, "not found"


class AlreadyExists(ShimError):
    code, suffix = Code.ALREADY_EXISTS, "already exists"


class FailedPrecondition(ShimError):
    code, suffix = Code.FAILED_PRECONDITION, "failed precondition"


class InvalidArgument(ShimError):
    code, suffix = Code.INVALID_ARGUMENT, "invalid argument"


class Unimplemented(ShimError):
    code, suffix = Code.UNIMPLEMENTED, "not implemented"


class Unavailable(ShimError):
    code, suffix = Code.UNAVAILABLE, "unavailable"


class DeadlineExceeded(ShimError):
    code, suffix = Code.DEADLINE_EXCEEDED, "context deadline exceeded"


class Internal(ShimError):
    code, suffix = Code.INTERNAL, "internal"
