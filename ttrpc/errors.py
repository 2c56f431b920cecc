"""ttrpc's error classes.

`StatusError` is an RPC failure with a google.rpc code: raised by handlers (and their subclasses in
the shim) and turned into a Response status by the server; raised by the client when a call fails.
`ProtocolError`s are about bytes on the wire: `LocalProtocolError` means *we* were about to break the
protocol (e.g. send an oversized message), `RemoteProtocolError` means the peer did.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc.Code (= gRPC status codes)."""

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


class TtrpcError(Exception):
    """Root of every error this package raises."""


class StatusError(TtrpcError):
    """An RPC that ended with a non-OK status."""

    code: Code = Code.UNKNOWN

    def __init__(self, message: str = "", code: Code | int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = Code(code) if code in Code._value2member_map_ else code  # type: ignore[assignment]

    @property
    def message(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={int(self.code)}, message={str(self)!r})"


class ClosedError(TtrpcError):
    """The connection is closed (Go: ttrpc.ErrClosed, "ttrpc: closed")."""

    def __init__(self, message: str = "ttrpc: closed") -> None:
        super().__init__(message)


class ProtocolError(TtrpcError):
    """The byte stream broke ttrpc's framing or message rules."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""
