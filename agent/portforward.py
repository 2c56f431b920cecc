"""Guest side of CRI port forwarding: one TCP connection to the pod's loopback per PortForward call.

The pod's containers share the VM's network namespace (agent/spec.py drops the network namespace),
so "localhost:PORT in the pod" is the agent's own loopback. The host (shim/portforward.py) relays
connections containerd made in the pod's netns on the host; here we connect and pipe bytes both
ways with half-close. No proto type here: server.py converts frames to the calls below.

Threads (the sync gRPC server): the handler's thread reads the socket and yields chunks; one more
thread of ours writes what the host sends. When the call ends for any reason (the host cancelled,
the channel died) the server's termination callback shuts the socket down, which wakes both.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from agent.errors import AgentError, FailedPrecondition, InvalidArgument

CHUNK = 64 << 10  # bytes per data frame, both ways (the host refuses bigger frames)
MAX_CONNECTIONS = 64  # above the host's own cap: a host bug, not a pod, should meet this
CONNECT_TIMEOUT_S = 10.0
# containerd dials localhost with tcp4 first, then tcp6; the host's listener always answers the
# tcp4 attempt, so the guest keeps that order to reach a server that listens on ::1 only
_TARGETS = {4: (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)), 6: (("::1", socket.AF_INET6),)}


class ResourceExhausted(AgentError):
    """Too many forwarded connections at once."""


@dataclass(frozen=True)
class Target:
    port: int
    family: int


def parse_target(port: int, family: int) -> Target:
    """The first frame's port and family. Raises InvalidArgument."""
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"port: {port} is not a TCP port")
    if family not in _TARGETS:
        raise InvalidArgument(f"family: {family} is neither 4 nor 6")
    return Target(port, family)


def connect(target: Target, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """Connect to the target on the loopback, in containerd's order. Raises FailedPrecondition."""
    errors = []
    for address, family in _TARGETS[target.family]:
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            s.connect((address, target.port))
            s.settimeout(None)
            return s
        except OSError as exc:
            s.close()
            errors.append(f"{address}: {exc.strerror or exc}")
    raise FailedPrecondition(f"port {target.port} in the pod: connect {'; '.join(errors)}")


class Forwarder:
    """Counts live connections and runs each one (`forward`)."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections

    def forward(self, target: Target, incoming: Iterable[bytes],
                on_end: Callable[[Callable[[], None]], object]) -> Iterator[bytes | None]:
        """Connect to `target`, then yield b"" once (connected), the chunks read from the connection,
        and None at its EOF. `incoming` is what the host sends; its end is the host's half-close.
        `on_end(fn)` registers fn to run when the call ends (grpc's add_callback).

        Raises ResourceExhausted, FailedPrecondition (nothing listens), OSError (a broken
        connection: the host resets its side).
        """
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(f"more than {self.max_connections} forwarded connections")
        try:
            sock = connect(target)
            with sock:
                yield from self._pipe(sock, incoming, on_end)
        finally:
            self._slots.release()

    def _pipe(self, sock: socket.socket, incoming: Iterable[bytes],
              on_end: Callable[[Callable[[], None]], object]) -> Iterator[bytes | None]:
        failed: list[BaseException] = []

        def stop() -> None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more

        def write() -> None:
            try:
                for data in incoming:
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # the host's half-close, passed on
            except BaseException as exc:  # the call ended, or the peer is gone: stop the reader too
                failed.append(exc)
                stop()

        on_end(stop)
        writer = threading.Thread(target=write, name="portforward-in", daemon=True)
        writer.start()
        try:
            yield b""  # connected
            while data := sock.recv(CHUNK):
                yield data
            if failed:
                raise failed[0]
            yield None  # the guest side's half-close
            writer.join()  # until the host half-closes too
            if failed:
                raise failed[0]
        finally:
            # no join on an error: the writer may wait for the host's next frame, which ends only
            # when the call does, right after this
            stop()
