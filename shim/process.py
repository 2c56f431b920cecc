"""Process lifecycle as an explicit state machine (containerd's runc shim uses the State pattern).

Illegal transitions raise FailedPrecondition with a readable message ("cannot pause task in created
state"), which containerd shows as-is.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .errors import FailedPrecondition, NotFound
from .resources.sizing import ContainerResources
from .stdio import HostStdio
from .timing import LifecycleTimer


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


_ALLOWED: dict[State, set[State]] = {
    State.CREATED: {State.RUNNING, State.STOPPED, State.DELETED},
    State.RUNNING: {State.PAUSED, State.STOPPED},
    State.PAUSED: {State.RUNNING, State.STOPPED},
    State.STOPPED: {State.DELETED},
    State.DELETED: set(),
}
# exit status reported when a process vanished with its VM or agent (containerd uses 255 likewise)
LOST_EXIT_STATUS = 255


@dataclass(eq=False)
class Process:
    """One process of a container: the init process (exec_id "") or an exec."""

    container_id: str
    exec_id: str
    stdio: HostStdio
    terminal: bool
    spec: dict[str, Any] | None = None  # OCI Process, for execs
    stdio_paths: tuple[str, str, str] = ("", "", "")
    state: State = State.CREATED
    pid: int = 0  # what containerd sees (Kata reports the hypervisor's pid)
    guest_pid: int = 0
    exit_status: int = 0
    exited_at: float | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    # held across Start so that an exit is never published before its start event
    start_lock: trio.Lock = field(default_factory=trio.Lock)
    timer: LifecycleTimer = field(default_factory=LifecycleTimer)  # Create/Exec → Delete, logged at Delete

    @property
    def name(self) -> str:
        return f"exec {self.exec_id} of container {self.container_id}" if self.exec_id else \
            f"container {self.container_id}"

    def require(self, action: str, *states: State) -> None:
        """Raises FailedPrecondition unless in one of `states`."""
        if self.state not in states:
            raise FailedPrecondition(f"cannot {action} task in {self.state.value} state")

    def move(self, new: State) -> None:
        if new is self.state:
            return
        if new not in _ALLOWED[self.state]:
            raise FailedPrecondition(f"cannot move {self.name} from {self.state.value} to {new.value}")
        self.state = new

    def set_exited(self, status: int, at: float | None = None) -> bool:
        """Record the exit once; return False if it was already recorded."""
        if self.exited.is_set():
            return False
        self.exit_status = status
        self.exited_at = time.time() if at is None else at
        if self.state is not State.DELETED:
            self.state = State.STOPPED
        self.exited.set()
        return True


@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    spec: dict[str, Any]
    is_sandbox: bool
    init: Process
    # what the VM sizing counts: the spec's linux.resources, then every Update merged in
    resources: ContainerResources = field(default_factory=ContainerResources)
    rootfs_mounts: list[Any] = field(default_factory=list)
    execs: dict[str, Process] = field(default_factory=dict)
    # guards exec-id allocation and Delete against concurrent Exec
    lock: trio.Lock = field(default_factory=trio.Lock)

    def process(self, exec_id: str) -> Process:
        """Raises NotFound for an unknown exec id."""
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"exec {exec_id} of container {self.id}") from None

    def running(self) -> bool:
        """Whether its resources belong in the VM: from create on (the workload's first instruction
        must find them, as in Kata, where only a stopped container gives them back) until it exits."""
        return self.init.state in (State.CREATED, State.RUNNING, State.PAUSED)
