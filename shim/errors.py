"""The closed set of errors the shim raises, and their containerd/gRPC status codes.

Handlers raise these; only the ttrpc boundary turns them into a status (containerd's errdefs.FromGRPC
maps the code back to ErrNotFound etc.), so the mapping lives in exactly one place.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc.Code values (the gRPC status codes)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ShimError(Exception):
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
