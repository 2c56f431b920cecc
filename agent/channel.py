"""Carry the host's byte stream to the gRPC server's local unix socket.

virtio-serial: one port, no connection framing. The agent keeps one local connection per host
connection: host disconnect (read EOF or POLLHUP) drops the local connection, so the next host
connection starts a fresh HTTP/2 session instead of continuing a half-finished one.
vsock: this grpcio build has no vsock listener, so an AF_VSOCK socket accepts and bridges. Any process
on the host can connect to a guest's vsock port (the CID is on QEMU's command line), so the agent
serves only its shim: a connection must come from the host (CID 2) from a privileged port (< 1024:
only CAP_NET_BIND_SERVICE can bind one) and start with the sandbox's token, which QEMU hands the guest
as an fw_cfg file (vmm/vsock.py); and only one connection is served at a time. Anything else is
closed without a word.
Imports are stdlib only: the channel opens before grpc is imported (import time dominates boot).
"""

import contextlib
import glob
import hmac
import os
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Callable

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


# Where QEMU's `-fw_cfg name=opt/io.kata-py/agent-token,...` shows up (module qemu_fw_cfg).
TOKEN_PATH = "/sys/firmware/qemu_fw_cfg/by_name/opt/io.kata-py/agent-token/raw"
TOKEN_LEN = 64  # lowercase hex digits, as vmm/vsock.py writes it
_TOKEN_RE = re.compile(rb"[0-9a-f]{%d}" % TOKEN_LEN)
PRIVILEGED_PORTS_BELOW = 1024  # vsock's LAST_RESERVED_PORT is 1023, as for IP
_PREAMBLE_TIMEOUT = 10.0  # the shim sends the token right after connecting
_MAX_HANDSHAKES = 4  # connections reading their token at once; more are closed at once
_JOIN_TIMEOUT = 5.0


def read_token(path: str = TOKEN_PATH) -> bytes:
    """The sandbox's agent token. Raises OSError when there is none (QEMU gave no fw_cfg file, or
    the kernel lacks qemu_fw_cfg), ValueError when it is not TOKEN_LEN lowercase hex digits."""
    try:
        with open(path, "rb") as f:
            token = f.read(TOKEN_LEN + 1)
    except OSError as e:
        raise OSError(e.errno, f"no agent token at {path} (QEMU -fw_cfg or module qemu_fw_cfg "
                               f"missing): {e.strerror}") from e
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"agent token at {path}: not {TOKEN_LEN} lowercase hex digits")
    return token


def vsock_peer_ok(peer: tuple[int, int]) -> bool:
    """A peer the agent talks to: the host (not this guest's own processes over vsock loopback),
    from a privileged port."""
    cid, port = peer
    return cid == socket.VMADDR_CID_HOST and port < PRIVILEGED_PORTS_BELOW


def _recv_exactly(sock: socket.socket, n: int, timeout: float) -> bytes:
    """Up to `n` bytes read before EOF, an error or `timeout` s in all (a slow drip cannot hold on)."""
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
    except OSError:
        pass
    return buf


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy until either side ends, then end both (so the other direction's pump wakes up too)."""
    try:
        while data := src.recv(_CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class AuthenticatedListener:
    """Serve a listening stream socket's connections to the local gRPC socket, one at a time, and
    only those from a peer `peer_ok` accepts that start with `token`.

    Family-agnostic (AF_VSOCK in the guest; tests use other families): `peer_ok` gets accept()'s
    peer address. `serve()` runs the accept loop until `stop()`; each connection gets a thread.
    """

    def __init__(self, listener: socket.socket, local_path: str, token: bytes,
                 peer_ok: Callable[[tuple], bool]) -> None:  # accept()'s address, any family
        if not _TOKEN_RE.fullmatch(token):
            raise ValueError(f"agent token must be {TOKEN_LEN} lowercase hex digits")
        self._listener = listener
        self._local_path = local_path
        self._token = token
        self._peer_ok = peer_ok
        self._lock = threading.Lock()  # guards everything below
        self._handshakes = 0
        # The one connection being served. A second authenticated connection while it lives is
        # refused, not allowed to replace it: only the shim has the token, and the shim keeps one
        # connection per VM, so a second one is either a leaked token (replacing would hand the
        # agent to its holder and cut the shim off) or a shim reconnect racing the old
        # connection's end. A dropped connection frees the slot as soon as its host side ends
        # (the host's close reaches the guest as EOF/RST), so the shim's reconnect, retried with
        # back-off by grpc, gets in.
        self._live: socket.socket | None = None
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._wake_r, self._wake_w = socket.socketpair()  # stop() wakes the accept loop through it
        self.thread: threading.Thread | None = None  # the thread running serve(), if stop() should join it

    def serve(self) -> None:
        """Accept until `stop()`. Raises OSError if the listener fails."""
        self._listener.setblocking(False)  # a peer gone between select and accept must not block us
        try:
            while True:
                ready, _, _ = select.select([self._listener, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                try:
                    conn, peer = self._listener.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                conn.setblocking(True)
                with self._lock:
                    admit = (not self._stopped and self._handshakes < _MAX_HANDSHAKES
                             and self._peer_ok(peer))
                    if admit:
                        self._handshakes += 1
                        self._socks.add(conn)
                if not admit:
                    conn.close()
                    continue
                t = threading.Thread(target=self._serve_one, args=(conn,), name="vsock-conn", daemon=True)
                with self._lock:
                    self._threads = [x for x in self._threads if x.is_alive()]
                    self._threads.append(t)
                t.start()
        finally:
            self._listener.close()

    def stop(self) -> None:
        """Stop accepting, cut every connection and wait for their threads. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True  # admits nothing from now on
        self._wake_w.send(b"x")
        if self.thread is not None:
            self.thread.join(_JOIN_TIMEOUT)  # after this no connection thread is added
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(_JOIN_TIMEOUT)
        self._wake_r.close()
        self._wake_w.close()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            got = _recv_exactly(conn, len(self._token), _PREAMBLE_TIMEOUT)
            with self._lock:
                self._handshakes -= 1
                # constant time: how much of a guess was right must not show in the timing
                admit = hmac.compare_digest(got, self._token) and self._live is None and not self._stopped
                if admit:
                    self._live = conn
            if not admit:
                return
            conn.settimeout(None)
            HOST_CONNECTED.set()
            self._bridge(conn)
        finally:
            with self._lock:
                if self._live is conn:
                    self._live = None
                self._socks.discard(conn)
            conn.close()

    def _bridge(self, host: socket.socket) -> None:
        try:
            local = connect_local(self._local_path)
        except OSError:
            return
        with self._lock:
            stopped = self._stopped
            self._socks.add(local)
        try:
            if stopped:  # stop() may have missed this socket
                return
            back = threading.Thread(target=_pump, args=(local, host), name="vsock-down", daemon=True)
            back.start()
            _pump(host, local)
            back.join()
        finally:
            with self._lock:
                self._socks.discard(local)
            local.close()


def serve_vsock(port: int, local_path: str, token_path: str = TOKEN_PATH) -> AuthenticatedListener:
    """Listen on vsock (any CID) `port` and serve the shim's connections in a daemon thread; return
    the listener (`stop()` ends it). Raises OSError if there is no token or the port cannot be bound,
    ValueError for a malformed token: better no agent than one anyone on the host can drive."""
    token = read_token(token_path)
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind((socket.VMADDR_CID_ANY, port))
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    gate = AuthenticatedListener(listener, local_path, token, vsock_peer_ok)
    gate.thread = threading.Thread(target=_logged(gate.serve), name="vsock-bridge", daemon=True)
    gate.thread.start()
    print(f"KATA_PY_AGENT_VSOCK port={port} token=fw_cfg", file=sys.stderr, flush=True)
    return gate


def _logged(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except BaseException as e:  # a dead bridge makes the VM unreachable: say so on the console
            print(f"KATA_PY_AGENT_CHANNEL_ERROR {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return run
