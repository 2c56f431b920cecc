"""How the host reaches the agent: a `Transport` opens the one grpc channel of a VM.

- `SerialTransport`: QEMU's virtio-serial chardev socket (`<state>/agent.sock`). The caller must first
  await the hypervisor's `wait_agent_port_open()` (QMP VSERPORT_CHANGE): dialing earlier stalls the
  first RPC for minutes. One long-lived channel per VM: the port has no connection framing, so the
  bridge refuses every reconnect once a connection has carried bytes.
- `VsockTransport`: AF_VSOCK to (cid, port). grpcio's Python channel does not resolve `vsock:` targets
  (checked with 1.85: it treats them as DNS names), so we bridge through a private unix socket too;
  vsock connections are independent streams, so reconnects are allowed.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol

import grpc

from agent_client.bridge import SocketBridge

VSOCK_DEVICE = "/dev/vhost-vsock"
AGENT_VSOCK_PORT = 1024
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
        family, address = self._upstream()
        self._bridge = SocketBridge(family, address, name=self.describe(), single_connection=self._single_connection)
        path = self._bridge.start()
        return grpc.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)

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
    """AF_VSOCK to the guest's agent port; each connection is its own stream."""

    _single_connection = False

    def __init__(self, cid: int, port: int = AGENT_VSOCK_PORT) -> None:
        super().__init__()
        if cid < 3:
            raise ValueError(f"guest vsock cid must be >= 3 (0-2 are reserved), got {cid}")
        self.cid = cid
        self.port = port

    def describe(self) -> str:
        return f"vsock:{self.cid}:{self.port}"

    def _upstream(self) -> tuple[int, object]:
        return socket.AF_VSOCK, (self.cid, self.port)
