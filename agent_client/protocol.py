"""The host's view of the in-guest agent: the `Agent` interface and its domain types.

No protobuf type crosses this boundary; `grpc_client.py` is the only module that converts between wire
messages and these dataclasses. Every method may raise an `AgentError` subclass (see `errors.py`);
implementations bound every call by a deadline except the ones documented as blocking.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Storage:
    """How a filesystem reaches the guest and where the agent mounts it (mount_point under /run/kata-py).

    driver: "9p" | "virtio-fs" | "blk" | "ephemeral" | "local" | "bind".
    """

    driver: str
    source: str
    mount_point: str
    fstype: str = ""
    options: tuple[str, ...] = ()
    driver_options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GuestDetails:
    mem_block_size_bytes: int  # hot-plugged memory must be a multiple of this
    online_cpus: int
    mem_total_bytes: int
    kernel_release: str
    agent_version: str
    oci_runtime: str  # "runc" or "crun"
    storage_handlers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CpuStats:
    total_usage_ns: int = 0
    percpu_usage_ns: tuple[int, ...] = ()
    kernel_ns: int = 0
    user_ns: int = 0


@dataclass(frozen=True, slots=True)
class MemoryStats:
    usage: int = 0
    max_usage: int = 0
    limit: int = 0
    cache: int = 0
    stats: Mapping[str, int] = field(default_factory=dict)  # memory.stat keys


@dataclass(frozen=True, slots=True)
class PidsStats:
    current: int = 0
    limit: int = 0


@dataclass(frozen=True, slots=True)
class ContainerStats:
    cpu: CpuStats = CpuStats()
    memory: MemoryStats = field(default_factory=MemoryStats)
    pids: PidsStats = PidsStats()


class OnlineResources(NamedTuple):
    online_cpus: int
    mem_total_bytes: int


@dataclass(frozen=True, slots=True)
class AgentVersion:
    grpc_version: str
    agent_version: str


@dataclass(frozen=True, slots=True)
class IPAddress:
    """One address with its prefix length; family 4 or 6."""

    address: str
    prefix_len: int
    family: int = 4


@dataclass(frozen=True, slots=True)
class Interface:
    """A guest NIC, found by its MAC (``hw_addr``); ``name`` is the guest's name for it."""

    name: str
    hw_addr: str
    mtu: int = 0
    addresses: tuple[IPAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """``dest`` is a CIDR or "" for the default route; ``device`` is the guest interface name.

    scope: RT_SCOPE_* (0 universe, 253 link, 254 host).
    """

    dest: str
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0
    family: int = 4


@dataclass(frozen=True, slots=True)
class ArpNeighbor:
    """A static neighbour entry: ``ip`` is at ``lladdr`` on guest interface ``device``."""

    ip: str
    device: str
    lladdr: str
    state: int = 0x80  # NUD_PERMANENT
    flags: int = 0
    family: int = 4


class PortForwardStream(Protocol):
    """One TCP connection to the pod's loopback in the guest (see `Agent.port_forward`).

    One task may send while another receives; neither method may be called by two tasks at once.
    """

    async def send(self, data: bytes) -> None:
        """Send at most PORT_FORWARD_CHUNK bytes; waits while the guest is behind (a few frames in
        flight at most)."""
        ...

    async def send_eof(self) -> None:
        """Half-close: the guest connection's write side is shut down. Idempotent."""
        ...

    async def receive(self) -> bytes:
        """The next bytes from the guest connection; b"" once it half-closed (and after)."""
        ...


PORT_FORWARD_CHUNK = 64 << 10  # bytes per frame, both ways; a bigger frame from the guest is refused


@runtime_checkable
class Agent(Protocol):
    """Host side of the agent protocol, async under trio.

    exec_id "" names a container's init process. Output and OOM streams are async iterators: close them
    with `contextlib.aclosing(...)` when not reading to EOF. All methods raise `AgentError` subclasses:
    `AgentUnavailable` when the channel is dead, `AgentTimeout` when a deadline passes, and the
    subclass matching the agent's own status otherwise.
    """

    # --- sandbox ---
    async def create_sandbox(
        self,
        hostname: str,
        dns: Sequence[str],
        storages: Sequence[Storage],
        sandbox_id: str,
        machine_id: str,
    ) -> None: ...

    async def destroy_sandbox(self) -> None: ...

    async def guest_details(self) -> GuestDetails: ...

    async def set_guest_datetime(self, t: float) -> None:
        """Set the guest clock to `t` seconds since the epoch (after boot or restore)."""
        ...

    async def reseed_random(self, data: bytes) -> None: ...

    # --- containers ---
    async def create_container(
        self,
        cid: str,
        oci_spec: Mapping[str, Any],
        rootfs: Storage,
        storages: Sequence[Storage] = (),
        terminal: bool = False,
        stdin: bool = False,
    ) -> int:
        """Create (not start) the container; returns its init process's guest pid."""
        ...

    async def start_container(self, cid: str) -> None: ...

    async def remove_container(self, cid: str, timeout: float) -> None:
        """Kill what is left of the container, wait up to `timeout` seconds (> 0), remove it."""
        ...

    async def update_container(self, cid: str, linux_resources: Mapping[str, Any]) -> None: ...

    async def stats_container(self, cid: str) -> ContainerStats: ...

    async def pause_container(self, cid: str) -> None: ...

    async def resume_container(self, cid: str) -> None: ...

    async def list_processes(self, cid: str) -> list[int]: ...

    # --- processes ---
    async def exec_process(
        self,
        cid: str,
        exec_id: str,
        process: Mapping[str, Any],
        terminal: bool = False,
        stdin: bool = False,
    ) -> int:
        """Create and start an extra process in a running container; returns its guest pid."""
        ...

    async def signal_process(self, cid: str, exec_id: str, signal: int, all: bool = False) -> None: ...

    async def wait_process(self, cid: str, exec_id: str) -> int:
        """Block (no deadline) until the process exits and return its status 0..255; cancellable."""
        ...

    async def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int:
        """Returns how many bytes the agent accepted (<= len(data))."""
        ...

    async def close_stdin(self, cid: str, exec_id: str) -> None: ...

    def read_stdout(self, cid: str, exec_id: str) -> AsyncIterator[bytes]:
        """Chunks of the process's stdout until EOF (no deadline; cancellable)."""
        ...

    def read_stderr(self, cid: str, exec_id: str) -> AsyncIterator[bytes]:
        """Chunks of the process's stderr until EOF (no deadline; cancellable)."""
        ...

    async def tty_win_resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None: ...

    # --- resources ---
    async def online_cpu_mem(self, nb_cpus: int, wait: bool) -> OnlineResources:
        """Online hot-added vCPUs and memory; with `wait`, until `nb_cpus` CPUs are online."""
        ...

    # --- network ---
    async def update_interface(self, interface: Interface) -> Interface:
        """Configure the guest NIC whose MAC is ``interface.hw_addr`` (waiting for it to appear):
        MTU, exactly these addresses, link up. Returns it as the guest now sees it (guest name)."""
        ...

    async def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        """Make the guest's main routing table hold these routes (connected ones the kernel keeps);
        returns the table afterwards."""
        ...

    async def add_arp_neighbors(self, neighbors: Sequence[ArpNeighbor]) -> None: ...

    async def list_interfaces(self) -> list[Interface]: ...

    async def list_routes(self) -> list[Route]: ...

    # --- port forwarding ---
    def port_forward(self, port: int, family: int = 4) -> AbstractAsyncContextManager[PortForwardStream]:
        """Connect to ``port`` on the guest's loopback (family 4: 127.0.0.1, then ::1, as containerd
        dials "localhost"; 6: ::1) for the life of the context. Entering raises
        AgentFailedPrecondition when nothing listens there, AgentTimeout when the guest does not
        answer within the control deadline, AgentUnavailable when too many calls are live; the
        stream's methods raise AgentError when the connection breaks. Leaving after both half-closes
        waits (up to the control deadline) until the guest has written everything it was sent;
        leaving otherwise (or on an error) closes the connection at once."""
        ...

    # --- events and health ---
    def oom_events(self) -> AsyncIterator[str]:
        """Ids of containers that saw an OOM kill, for the life of the channel (cancellable)."""
        ...

    async def check(self) -> bool:
        """True when the agent reports SERVING."""
        ...

    async def version(self) -> AgentVersion: ...

    async def aclose(self) -> None:
        """Cancel every call in flight and release the channel; idempotent."""
        ...
