"""Carry the host's byte stream to the gRPC server's local unix socket.

virtio-serial: one port, no connection framing. The agent keeps one local connection per host
connection: host disconnect (read EOF or POLLHUP) drops the local connection, so the next host
connection starts a fresh HTTP/2 session instead of continuing a half-finished one.
vsock: this grpcio build has no vsock listener, so an AF_VSOCK socket accepts and each connection gets
its own local connection.
Imports are stdlib only: the channel opens before grpc is imported (import time dominates boot).
"""

import glob
import os
import select
import socket
import sys
import threading
import time

_CHUNK = 64 * 1024
_HUP_SLEEP = 0.05  # POLLHUP is level-triggered while no host is connected: sleep, don't spin
_CONNECT_TIMEOUT = 60.0  # the first host bytes may arrive before the gRPC server is listening
# set once the host first reached the agent (its first bytes, or its first vsock connection): a
# clone nobody has used yet warms itself up (agent/warm_up.py)
HOST_CONNECTED = threading.Event()


def find_serial_port(name: str, sys_root: str = "/sys/class/virtio-ports", dev_root: str = "/dev",
                     timeout: float = 30.0) -> str:
    """Return the /dev path of the virtio-serial port called `name`, creating its node if missing
    (there is no udev). Raises FileNotFoundError when it does not appear within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        for d in sorted(glob.glob(os.path.join(sys_root, "*"))):
            try:
                with open(os.path.join(d, "name")) as f:
                    if f.read().strip() != name:
                        continue
                path = os.path.join(dev_root, os.path.basename(d))
                if not os.path.exists(path):
                    with open(os.path.join(d, "dev")) as f:
                        major, minor = f.read().strip().split(":")
                    os.mknod(path, 0o600 | 0o020000, os.makedev(int(major), int(minor)))
                return path
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"virtio-serial port {name!r} not found under {sys_root}")
        time.sleep(0.02)


def connect_local(path: str, timeout: float = _CONNECT_TIMEOUT) -> socket.socket:
    """Connect to the local gRPC socket, waiting for the server to come up.
    Raises OSError if it is still not there after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class SerialBridge:
    """Copy bytes between a virtio-serial port fd and per-host-connection local sockets."""

    def __init__(self, port_fd: int, local_path: str) -> None:
        self.port_fd = port_fd
        self.local_path = local_path
        self._conn: socket.socket | None = None
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run(self) -> None:
        """Bridge until `stop()`; returns after at most one poll interval. Raises OSError on port
        failure."""
        try:
            while not self._stop:
                self.step(1000)
        finally:
            self._drop()

    def step(self, timeout_ms: int) -> None:
        """One poll round: move whatever is ready in either direction."""
        poller = select.poll()
        poller.register(self.port_fd, select.POLLIN)
        conn = self._conn
        if conn is not None:
            poller.register(conn.fileno(), select.POLLIN)
        for fd, ev in poller.poll(timeout_ms):
            if fd == self.port_fd:
                data = os.read(self.port_fd, _CHUNK) if ev & select.POLLIN else b""
                if not data:  # host disconnected (EOF), or not connected at all (POLLHUP)
                    self._drop()
                    time.sleep(_HUP_SLEEP)
                    return
                if self._conn is None:
                    HOST_CONNECTED.set()
                    self._conn = connect_local(self.local_path)
                self._conn.sendall(data)
            elif conn is not None and conn is self._conn:
                data = conn.recv(_CHUNK)
                if not data:  # the server closed: the next host bytes open a new connection
                    self._drop()
                    continue
                _write_all(self.port_fd, data)


def serve_serial(name: str, local_path: str) -> threading.Thread:
    """Find the port, open it and bridge it in a daemon thread. Raises FileNotFoundError/OSError."""
    path = find_serial_port(name)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    bridge = SerialBridge(fd, local_path)
    t = threading.Thread(target=_logged(bridge.run), name="serial-bridge", daemon=True)
    t.start()
    return t


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(_CHUNK):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # either side went away: the other copier ends too
    finally:
        src.close()


def _splice(host: socket.socket, local_path: str) -> None:
    try:
        local = connect_local(local_path)
    except OSError:
        host.close()
        return
    threading.Thread(target=_copy, args=(local, host), daemon=True).start()
    _copy(host, local)


def serve_vsock(port: int, local_path: str) -> threading.Thread:
    """Listen on vsock (any CID) `port` and bridge every connection. Raises OSError if it cannot bind."""
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(16)

    def accept_loop() -> None:
        while True:
            conn, _ = listener.accept()
            HOST_CONNECTED.set()
            threading.Thread(target=_splice, args=(conn, local_path), daemon=True).start()

    t = threading.Thread(target=_logged(accept_loop), name="vsock-bridge", daemon=True)
    t.start()
    return t


def _logged(fn):  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            fn()
        except BaseException as e:  # a dead bridge makes the VM unreachable: say so on the console
            print(f"KATA_PY_AGENT_CHANNEL_ERROR {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return run
