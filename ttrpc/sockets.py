"""Listening unix socket files (stdlib only: the shim's `start` action needs this without trio)."""

from __future__ import annotations

import os
import socket as stdlib_socket


def bind_unix_socket(path: str, *, mode: int = 0o600, backlog: int = 128) -> stdlib_socket.socket:
    """Create a listening unix socket file with `mode` (never an abstract socket).

    Raises OSError (EADDRINUSE when the path exists) like bind(2).
    """
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        # umask so the socket is never briefly wider than `mode`
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
