"""A private unix socket in front of an upstream stream socket, so grpc can dial what it cannot itself.

grpcio 1.85's Python channel does not resolve `vsock:` targets, and it cannot adopt a socket we opened.
The bridge listens on a fresh unix socket (0700 temp dir) and, for each connection grpc makes, dials the
upstream (AF_VSOCK, or QEMU's virtio-serial chardev socket) and copies bytes both ways with two threads.

`single_connection=True` enforces the virtio-serial rule: once one upstream connection has carried
bytes, it is the only one ever; later grpc reconnects are refused, because a second HTTP/2 stream on the
same unframed port would be mixed with the first. The agent then reports `AgentUnavailable`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_BUF = 64 * 1024
_JOIN_TIMEOUT = 5.0
_CONNECT_TIMEOUT = 5.0  # AF_VSOCK to a missing guest only fails after the kernel's 2 s timeout


class SocketBridge:
    """Owns one listening unix socket, its accept thread and two pump threads per live connection."""

    def __init__(self, family: int, address: Any, *, name: str, single_connection: bool) -> None:
        self._family = family
        self._address = address
        self._name = name
        self._single = single_connection
        self._lock = threading.Lock()  # guards _socks, _threads, _used, _closed
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._used = False  # an upstream connection was established (single_connection rule)
        self._closed = False
        self._dir: str | None = None
        self._listener: socket.socket | None = None
        # close() writes here to abort an upstream connect() in progress (shutdown() cannot)
        self._wake_r, self._wake_w = socket.socketpair()
        self.connected_once = False
        self.last_error: str | None = None

    @property
    def path(self) -> str:
        assert self._dir is not None, "bridge not started"
        return os.path.join(self._dir, "agent.sock")

    def start(self) -> str:
        """Listen and start the accept thread; returns the unix socket path.

        Raises:
            OSError: the socket cannot be created.
        """
        self._dir = tempfile.mkdtemp(prefix="kata-py-agent-")  # mkdtemp makes it 0700
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(4)
        self._listener = listener
        self._spawn(self._accept_loop, "accept")
        return self.path

    def close(self) -> None:
        """Stop accepting, cut every connection, join every thread, remove the socket. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            socks = list(self._socks)
            threads = list(self._threads)
        self._wake_w.send(b"x")
        if self._listener is not None:
            # shutdown() wakes the accept() blocked in the accept thread (Linux: EINVAL)
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(_JOIN_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _spawn(self, fn: Callable[..., None], what: str, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, name=f"agent-bridge {self._name} {what}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _track(self, s: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._socks.add(s)
            return True

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refuse = self._single and self._used
            if refuse:
                log.warning("agent bridge %s: refusing a second connection on a single-stream channel", self._name)
                down.close()
                continue
            try:
                up = self._connect()
            except OSError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                down.close()
                continue
            with self._lock:
                self._used = True
            self.connected_once = True
            if not (self._track(down) and self._track(up)):
                down.close()
                up.close()
                return
            self._spawn(self._pump, "up", down, up)
            self._spawn(self._pump, "down", up, down)

    def _connect(self) -> socket.socket:
        """Connect to the upstream address; close() aborts a connect in progress.

        Raises:
            OSError: the connect failed, timed out, or the bridge is closing.
        """
        s = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            err = s.connect_ex(self._address)
            if err == errno.EINPROGRESS:
                readable, writable, _ = select.select([self._wake_r], [s], [], _CONNECT_TIMEOUT)
                if readable:
                    raise ConnectionAbortedError("bridge closed while connecting")
                if not writable:
                    raise TimeoutError(errno.ETIMEDOUT, "connect timed out")
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            s.setblocking(True)
        except OSError:
            s.close()
            raise
        return s

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_BUF):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # One side ended: end both, so the peer pump wakes up too; the last one out closes the fds.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                last = src not in self._socks
                self._socks.discard(src)
                self._socks.discard(dst)
            if last:
                src.close()
                dst.close()
