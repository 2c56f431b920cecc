"""CRI port forwarding for pods whose workload runs in the VM.

containerd serves CRI PortForward by entering the pod's netns on the host and dialing
localhost:PORT there (tcp4, then tcp6; pkg/cri/server/sandbox_portforward_linux.go in 1.6/1.7,
internal/cri/server/ in 2.x). In a kata-py pod nothing listens there: the netns holds only the veth
and our tap, and the guest's packets never enter its IP stack (tc mirred). So, per sandbox:

1. a TCP listener on 127.0.0.1 (and ::1 when the netns has it) on an ephemeral port, created inside
   the netns (a socket keeps the netns it was made in);
2. in the netns, `iptables -t nat -A OUTPUT -o lo -p tcp -d 127.0.0.1 ! --dport L -j REDIRECT
   --to-ports L` (ip6tables for ::1): every loopback connection made in the netns reaches us;
3. per accepted connection, the port the client dialed (SO_ORIGINAL_DST) and a PortForward call to
   the agent, which connects to that port on the guest's loopback (the pod's containers share the
   VM's netns); bytes are piped both ways with half-close; a refused port resets the connection.

Everything runs in the task `PortForward.run` (the sandbox's nursery); cancelling it closes every
connection and removes the rules. Bounded: MAX_CONNECTIONS at once (more are reset at once), frames
of PORT_FORWARD_CHUNK bytes. The guest only answers on connections the host accepted: it never names
an address or port the host would use.

Without iptables (or with a loopback that is down) there is no port forwarding: a warning, nothing
else changes. Alternatives weighed (docs/architecture.md): BPF sk_lookup would steer the lookups to
our socket without NAT, but means loading a BPF program; mirroring the guest's listeners into the
netns means polling the guest and races with short-lived servers.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass

import trio

from agent_client.protocol import PORT_FORWARD_CHUNK, Agent, PortForwardStream
from kata_trio import open_nursery_unwrapped
from shim.network.netns import run_in_netns

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  # each holds a long-lived agent call (the agent client has 96 for everything)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same number on SOL_IPV6
COMMENT = "kata-py port-forward"
_LOOPBACK = {4: "127.0.0.1", 6: "::1"}
_TOOL = {4: "iptables", 6: "ip6tables"}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_IPTABLES_TIMEOUT_S = 20.0
_SIOCGIFFLAGS, _IFF_UP = 0x8913, 0x1


class PortForwardUnavailable(Exception):
    """Port forwarding cannot be set up in this netns (no iptables, loopback down, ...)."""


# --- pure parts ------------------------------------------------------------------------------------

def redirect_rule(family: int, port: int) -> list[str]:
    """The nat OUTPUT rule (after -A/-D) sending every loopback TCP connection but ours to `port`."""
    return ["OUTPUT", "-o", "lo", "-p", "tcp", "-d", _LOOPBACK[family], "!", "--dport", str(port),
            "-m", "comment", "--comment", COMMENT, "-j", "REDIRECT", "--to-ports", str(port)]


def iptables_argv(tool: str, action: str, family: int, port: int) -> list[str]:
    """`tool` is the path of iptables or ip6tables; action "-A", "-D" or "-C"."""
    return [tool, "-w", "5", "-t", "nat", action, *redirect_rule(family, port)]


def original_port(family: int, raw: bytes) -> int:
    """The destination port of a sockaddr_in / sockaddr_in6 as SO_ORIGINAL_DST returns it.

    Raises ValueError for a short or foreign address."""
    want, size = (socket.AF_INET, 16) if family == 4 else (socket.AF_INET6, 28)
    if len(raw) < size:
        raise ValueError(f"SO_ORIGINAL_DST: {len(raw)} bytes")
    af, port = struct.unpack_from("=HH", raw)  # family in host order, port in network order
    if af != want:
        raise ValueError(f"SO_ORIGINAL_DST: address family {af}")
    return socket.ntohs(port)


# --- in the netns (a thread of its own: run_in_netns) ----------------------------------------------

@dataclass
class Listener:
    family: int
    sock: socket.socket
    port: int


def _tool(family: int) -> str:
    path = shutil.which(_TOOL[family]) or shutil.which(_TOOL[family], path="/usr/sbin:/sbin")
    if path is None:
        raise PortForwardUnavailable(f"{_TOOL[family]} not found")
    return path


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_IPTABLES_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise PortForwardUnavailable(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _listen(family: int) -> socket.socket:
    sock = socket.socket(_AF[family], socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((_LOOPBACK[family], 0))
        sock.listen(64)
        return sock
    except BaseException:
        sock.close()
        raise


def loopback_is_up() -> bool:
    """Whether `lo` of the calling thread's netns is up (a bind to 127.0.0.1 works even when not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        reply = fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0))
    return bool(struct.unpack("16sh", reply)[1] & _IFF_UP)


def open_listeners() -> list[Listener]:
    """Listen on the netns's loopback and install the redirects. Call in the netns.

    IPv6 is best effort (no ::1, no ip6tables nat: logged, IPv4 only). Raises PortForwardUnavailable.
    """
    if not loopback_is_up():  # containerd's own dial would fail too (CNI's loopback plugin is missing)
        raise PortForwardUnavailable("the pod's loopback is down (is lo up?)")
    listeners: list[Listener] = []
    try:
        for family in (4, 6):
            try:
                tool = _tool(family)
                sock = _listen(family)
            except OSError as exc:
                if family == 6:
                    log.info("port-forward: no IPv6 loopback in the pod's netns (%s)", exc.strerror)
                    continue
                raise PortForwardUnavailable(f"listening on 127.0.0.1 (is lo up?): {exc.strerror}") from exc
            except PortForwardUnavailable as exc:
                if family == 6:
                    log.info("port-forward: IPv4 only: %s", exc)
                    continue
                raise
            listener = Listener(family, sock, sock.getsockname()[1])
            try:
                _run(iptables_argv(tool, "-A", family, listener.port))
            except (PortForwardUnavailable, OSError, subprocess.TimeoutExpired) as exc:
                sock.close()
                if family == 6:
                    log.info("port-forward: IPv4 only: %s", exc)
                    continue
                raise PortForwardUnavailable(str(exc)) from exc
            listeners.append(listener)
    except BaseException:
        remove_rules(listeners)
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def remove_rules(listeners: list[Listener]) -> list[str]:
    """Delete our redirects (call in the netns); returns what could not be removed."""
    left = []
    for listener in listeners:
        try:
            _run(iptables_argv(_tool(listener.family), "-D", listener.family, listener.port))
        except (PortForwardUnavailable, OSError, subprocess.TimeoutExpired) as exc:
            left.append(f"{_TOOL[listener.family]} {listener.port}: {exc}")
    return left


# --- the task --------------------------------------------------------------------------------------

def _reset(sock: trio.socket.SocketType) -> None:
    """Close with an RST: the client sees ECONNRESET, as when its dial is refused."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class PortForward:
    """The sandbox's port forwarding into `netns`, over `agent`. `run` is the whole life."""

    def __init__(self, netns: str, agent: Agent, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.netns = netns
        self._agent = agent
        self._slots = max_connections
        self.live = 0  # connections being forwarded now
        self.ports: dict[int, int] = {}  # family -> listener port, while running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Set up (raises PortForwardUnavailable before started()), then serve until cancelled;
        always removes the rules and closes every socket."""
        # not abandoned on cancel: the thread always returns its listeners, so none can leak
        listeners = await trio.to_thread.run_sync(run_in_netns, self.netns, open_listeners)
        socks = [trio.socket.from_stdlib_socket(x.sock) for x in listeners]
        try:
            self.ports = {x.family: x.port for x in listeners}
            log.info("port-forward: netns %s: loopback connections go to the guest (listening on %s)",
                     self.netns, ", ".join(f"{_LOOPBACK[x.family]}:{x.port}" for x in listeners))
            async with trio.open_nursery() as nursery:
                for x, sock in zip(listeners, socks, strict=True):
                    nursery.start_soon(self._accept, sock, x.family, nursery)
                task_status.started()
        finally:
            for sock in socks:
                sock.close()
            self.ports = {}
            with trio.CancelScope(shield=True):
                await self._remove(listeners)

    async def _remove(self, listeners: list[Listener]) -> None:
        try:
            left = await trio.to_thread.run_sync(run_in_netns, self.netns, lambda: remove_rules(listeners))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # a netns already gone took the rules with it
                log.warning("port-forward: netns %s: rules not removed: %s", self.netns, exc)
            return
        for what in left:
            log.warning("port-forward: netns %s: rule not removed: %s", self.netns, what)

    async def _accept(self, listener: trio.socket.SocketType, family: int, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn, peer = await listener.accept()
            except OSError as exc:  # EMFILE and the like: the next connection may well work
                log.warning("port-forward: netns %s: accept: %s", self.netns, exc)
                await trio.sleep(0.5)
                continue
            if not ipaddress.ip_address(peer[0]).is_loopback:  # cannot happen on lo; never serve it
                _reset(conn)
                continue
            if self.live >= self._slots:
                log.warning("port-forward: netns %s: %d connections already, one more refused",
                            self.netns, self.live)
                _reset(conn)
                continue
            self.live += 1
            nursery.start_soon(self._serve, conn, family)

    async def _serve(self, conn: trio.socket.SocketType, family: int) -> None:
        port = 0
        try:
            port = _dialed_port(conn, family)
            async with self._agent.port_forward(port, family) as guest:
                await _pipe(trio.SocketStream(conn), guest)
        except Exception as exc:  # AgentError, OSError (or a group of them): reset this one only
            log.info("port-forward: netns %s: port %d: %s", self.netns, port, _describe(exc))
            _reset(conn)
        finally:
            self.live -= 1
            conn.close()


def _dialed_port(conn: trio.socket.SocketType, family: int) -> int:
    """The port the client connected to, before our REDIRECT."""
    level = socket.SOL_IP if family == 4 else socket.IPPROTO_IPV6  # SOL_IPV6 == IPPROTO_IPV6
    try:
        return original_port(family, conn.getsockopt(level, SO_ORIGINAL_DST, 28))
    except (OSError, ValueError):  # not redirected: the client dialed our own port
        return int(conn.getsockname()[1])


async def _pipe(conn: trio.SocketStream, guest: PortForwardStream) -> None:
    """Both directions until both ended; an error in either ends both (the caller resets)."""

    async def up() -> None:
        while data := await conn.receive_some(PORT_FORWARD_CHUNK):
            await guest.send(data)
        await guest.send_eof()

    async def down() -> None:
        while data := await guest.receive():
            await conn.send_all(data)
        await conn.send_eof()

    async with open_nursery_unwrapped() as nursery:
        nursery.start_soon(up)
        nursery.start_soon(down)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


class Running:
    """A started PortForward task: `stop()` cancels it and waits until its rules are gone."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.CancelScope(shield=True):
            await self.done.wait()


async def start(netns: str, agent: Agent, nursery: trio.Nursery) -> Running | None:
    """Run port forwarding for `netns` in `nursery` (the sandbox's). Not being able to is a warning
    (None): the pod runs without `kubectl port-forward`."""
    running = Running()

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await PortForward(netns, agent).run(task_status=task_status)
        finally:
            running.done.set()

    try:
        await nursery.start(run)
    except (PortForwardUnavailable, OSError) as exc:
        log.warning("port-forward: netns %s: unavailable, CRI PortForward will fail: %s", netns, exc)
        return None
    return running
