"""How the host reaches the agent: a `Transport` opens the one grpc channel of a VM.

- `SerialTransport`: QEMU's virtio-serial chardev socket (`<state>/agent.sock`). The caller must first
  await the hypervisor's `wait_agent_port_open()` (QMP VSERPORT_CHANGE): dialing earlier stalls the
  first RPC for minutes. One long-lived channel per VM: the port has no connection framing, so the
  bridge refuses every reconnect once a connection has carried bytes.
- `VsockTransport`: AF_VSOCK to (cid, port). grpcio's Python channel does not resolve `vsock:` targets
  (checked with 1.85: it treats them as DNS names), so we bridge through a private unix socket too;
  vsock connections are independent streams, so reconnects are allowed. The agent serves only its
  shim (agent/channel.py): each connection is made from a privileged source port (bound before
  connect: needs CAP_NET_BIND_SERVICE) and starts with the sandbox's token (vmm/vsock.py).
"""

from __future__ import annotations

import errno
import os
import random
import re
import select
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from agent_client.bridge import SocketBridge

# What socket.bind/connect take: (host, port), (cid, port) or a unix path
SockAddress = tuple[Any, ...] | str

VSOCK_DEVICE = "/dev/vhost-vsock"
AGENT_VSOCK_PORT = 1024
# Source ports the host side binds: privileged ones (vsock reserves 0-1023, as IP does; 0 is left
# out). Every shim's live connection holds one, host-wide, so they are tried in random order.
PRIVILEGED_SOURCE_PORTS = range(1, 1024)
_TOKEN_RE = re.compile(rb"[0-9a-f]{64}")  # vmm/vsock.py's format; the agent refuses anything else
_DIAL_TIMEOUT = 5.0  # AF_VSOCK to a missing guest only fails after the kernel's 2 s timeout
_MAX_MESSAGE = 8 << 20  # a few MiB: OCI specs, stdin writes, output chunks are all far smaller

# Why each option: the agent is one peer on a private link, not a service behind a load balancer.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.use_local_subchannel_pool", 1),  # never share a connection with another VM's channel
    ("grpc.enable_retries", 0),  # our calls are not idempotent; retry policy is ours
    ("grpc.client_idle_timeout_ms", 2**31 - 1),  # going idle drops the connection: fatal on serial
    ("grpc.initial_reconnect_backoff_ms", 100),  # connect_agent's retries should see the agent soon
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def vsock_available() -> bool:
    """True when the host can give guests a vhost-vsock device."""
    return os.path.exists(VSOCK_DEVICE)


class Transport(Protocol):
    """Something that yields the grpc channel to one VM's agent and owns what backs it."""

    def describe(self) -> str:
        """Human-readable target for error messages."""
        ...

    def open(self) -> grpc.Channel:
        """Create the channel (does not wait for the agent). Raises OSError if it cannot."""
        ...

    def connect_error(self) -> str | None:
        """Why the last attempt to reach the agent failed, or None if it connected."""
        ...

    def ever_connected(self) -> bool:
        """True once a connection to the agent's side was established."""
        ...

    def close(self) -> None:
        """Release everything open() made (threads, sockets). Idempotent."""
        ...


class _BridgedTransport:
    """A grpc channel to a private unix socket bridged to the agent's socket."""

    _single_connection: bool

    def __init__(self) -> None:
        self._bridge: SocketBridge | None = None

    def describe(self) -> str:
        raise NotImplementedError

    def _upstream(self) -> tuple[int, object]:
        """(address family, address) of the agent's socket."""
        raise NotImplementedError

    def open(self) -> grpc.Channel:
        if self._bridge is not None:
            raise RuntimeError(f"{self.describe()}: transport already opened (one channel per VM)")
        self._bridge = self._make_bridge()
        path = self._bridge.start()
        return grpc.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)

    def _make_bridge(self) -> SocketBridge:
        family, address = self._upstream()
        return SocketBridge(family, address, name=self.describe(), single_connection=self._single_connection)

    def connect_error(self) -> str | None:
        return None if self._bridge is None else self._bridge.last_error

    def ever_connected(self) -> bool:
        return self._bridge is not None and self._bridge.connected_once

    def close(self) -> None:
        if self._bridge is not None:
            self._bridge.close()


class SerialTransport(_BridgedTransport):
    """QEMU's virtio-serial chardev socket (server=on): one connection for the life of the VM."""

    _single_connection = True

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = socket_path

    def describe(self) -> str:
        return f"virtio-serial {self.socket_path}"

    def _upstream(self) -> tuple[int, object]:
        return socket.AF_UNIX, self.socket_path


class VsockTransport(_BridgedTransport):
    """AF_VSOCK to the guest's agent port; each connection is its own stream, authenticated by a
    privileged source port and the sandbox's `token` (see agent/channel.py)."""

    _single_connection = False
    _family: int = socket.AF_VSOCK

    def __init__(self, cid: int, port: int = AGENT_VSOCK_PORT, *, token: bytes,
                 source_ports: Sequence[int] = PRIVILEGED_SOURCE_PORTS) -> None:
        super().__init__()
        if cid < 3:
            raise ValueError(f"guest vsock cid must be >= 3 (0-2 are reserved), got {cid}")
        if not _TOKEN_RE.fullmatch(token):
            raise ValueError("agent token must be 64 lowercase hex digits (vmm/vsock.py)")
        if not source_ports or any(not 0 <= p < 1024 for p in source_ports):
            raise ValueError("source ports must be privileged (< 1024): the agent refuses others")
        self.cid = cid
        self.port = port
        self._token = token
        self._source_ports = source_ports

    def describe(self) -> str:
        return f"vsock:{self.cid}:{self.port}"

    def _upstream(self) -> tuple[int, object]:
        return self._family, (self.cid, self.port)

    def _local_address(self, port: int) -> SockAddress:
        """Where to bind before connecting (tests replace the family and these methods)."""
        return (socket.VMADDR_CID_ANY, port)

    def _bind(self, sock: socket.socket) -> int:
        return bind_privileged(sock, self._local_address, self._source_ports)

    def _make_bridge(self) -> SocketBridge:
        family, address = self._upstream()
        return _AuthenticatedBridge(family, address, name=self.describe(), token=self._token, bind=self._bind)


def bind_privileged(sock: socket.socket, local_address: Callable[[int], SockAddress],
                    ports: Sequence[int] = PRIVILEGED_SOURCE_PORTS) -> int:
    """Bind `sock` to the first free one of `ports` (tried in random order); return it.

    Raises PermissionError without CAP_NET_BIND_SERVICE, OSError(EADDRINUSE) when all are taken.
    """
    for port in random.sample(list(ports), len(ports)):
        try:
            sock.bind(local_address(port))
            return port
        except PermissionError as e:
            raise PermissionError(e.errno, "binding a privileged source port for the agent needs "
                                           f"CAP_NET_BIND_SERVICE: {e.strerror}") from e
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"all {len(ports)} privileged source ports are in use")


def dial_authenticated(family: int, address: Any, token: bytes, bind: Callable[[socket.socket], int],
                       abort: socket.socket | None = None, timeout: float = _DIAL_TIMEOUT) -> socket.socket:
    """A connected stream socket to `address` that `bind` bound first, the token already sent.

    `abort` becoming readable aborts a connect in progress. Raises OSError (ConnectionAbortedError
    when aborted, TimeoutError after `timeout`).
    """
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        bind(s)
        s.setblocking(False)
        err = s.connect_ex(address)
        if err == errno.EINPROGRESS:
            readable, writable, _ = select.select([abort] if abort is not None else [], [s], [], timeout)
            if readable:
                raise ConnectionAbortedError("bridge closed while connecting")
            if not writable:
                raise TimeoutError(errno.ETIMEDOUT, "connect timed out")
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        s.setblocking(True)
        s.sendall(token)  # before any gRPC byte: the agent reads exactly this many first
    except OSError:
        s.close()
        raise
    return s


class _AuthenticatedBridge(SocketBridge):
    """SocketBridge whose upstream connections are dial_authenticated's.

    Overrides SocketBridge._connect and uses its `_wake_r` (close() writes there to abort a connect):
    a `dial` hook in SocketBridge would be the clean way; bridge.py belongs to the trio port now.
    """

    def __init__(self, family: int, address: Any, *, name: str, token: bytes,
                 bind: Callable[[socket.socket], int]) -> None:
        super().__init__(family, address, name=name, single_connection=False)
        self._token = token
        self._bind = bind

    def _connect(self) -> socket.socket:
        return dial_authenticated(self._family, self._address, self._token, self._bind, abort=self._wake_r)
