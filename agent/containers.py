"""Containers in the guest: bundles, lifecycle state machine and processes, over an OciRuntime."""

import enum
import itertools
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent import cgroups
from agent.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from agent.oci_runtime import OciRuntime, read_pid_file
from agent.paths import validate_id
from agent.process import Process
from agent.reaper import Reaper
from agent.spec import exec_process, guest_spec, pod_network_sysctls, pod_sandbox_id, runtime_spec_version
from agent.stdio import ProcessStdio
from agent.storage import Mounted, unmount_storage
from agent.volumes import PodVolumes

log = logging.getLogger("agent")


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class Container:
    """One container: its bundle, state, init process, execs and the storages mounted for it."""

    id: str
    bundle: str
    init: Process
    cgroup: str
    storages: list[Mounted] = field(default_factory=list)
    execs: dict[str, Process] = field(default_factory=dict)
    paused: bool = False
    started: bool = False

    @property
    def state(self) -> State:
        if self.init.exited:
            return State.STOPPED
        if self.paused:
            return State.PAUSED
        return State.RUNNING if self.started else State.CREATED

    def require(self, *states: State, action: str) -> None:
        """Raise FailedPrecondition ("cannot pause container X in created state") unless in `states`."""
        if self.state not in states:
            raise FailedPrecondition(f"cannot {action} container {self.id} in {self.state.value} state")


class Containers:
    """All containers of the sandbox. Handlers look containers up here and delegate to the runtime."""

    def __init__(self, root: str, runtime: OciRuntime, reaper: Reaper,
                 cgroup_root: str = cgroups.CGROUP_ROOT, volumes: PodVolumes | None = None) -> None:
        self.root = root
        self.runtime = runtime
        self.volumes = volumes or PodVolumes(root)  # the pod's emptyDirs, released with each container
        self._reaper = reaper
        self._cgroup_root = cgroup_root
        self._lock = threading.Lock()  # guards _containers (membership only; objects have own state)
        self._containers: dict[str, Container] = {}
        self._consoles = itertools.count()

    def _console_socket(self) -> str:
        """A fresh path for the runtime's --console-socket. Not under the bundle: CRI's container and
        exec ids are 64 characters each, and `<root>/containers/<cid>/exec-<eid>.sock` would pass
        AF_UNIX's 107 bytes (critest's tty exec failed with 'AF_UNIX path too long')."""
        directory = os.path.join(self.root, "consoles")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.path.join(directory, f"{next(self._consoles)}.sock")

    def get(self, container_id: str) -> Container:
        """Raises NotFound if no such container."""
        with self._lock:
            c = self._containers.get(container_id)
        if c is None:
            raise NotFound(f"container {container_id}: not found")
        return c

    def all(self) -> list[Container]:
        with self._lock:
            return list(self._containers.values())

    def process(self, container_id: str, exec_id: str) -> Process:
        """The init process (exec_id "") or an exec. Raises NotFound for either unknown id."""
        c = self.get(container_id)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id} of container {container_id}: not found")
        return p

    def create(self, container_id: str, spec: dict[str, Any], rootfs: str, terminal: bool,
               want_stdin: bool, storages: list[Mounted]) -> Container:
        """Write the guest bundle and `runtime create` the container; return it in created state.

        Raises AlreadyExists, InvalidArgument (bad spec) or Internal (runtime failure; the bundle is
        removed again, the storages are left to the caller).
        """
        validate_id(container_id, "container_id")
        bundle = os.path.join(self.root, "containers", container_id)
        with self._lock:
            if container_id in self._containers:
                raise AlreadyExists(f"container {container_id}: already exists")
            try:
                os.makedirs(bundle, mode=0o700)
            except FileExistsError as e:
                raise AlreadyExists(f"container {container_id}: bundle {bundle} already exists") from e
        stdio = None
        try:
            config = guest_spec(spec, container_id, rootfs, terminal, self._pod_init_pid(spec, container_id),
                                runtime_spec_version(self.runtime.version()))
            if config.get("ociVersion") != spec.get("ociVersion"):
                log.info("container %s: ociVersion %s -> %s (what %s implements)", container_id,
                         spec.get("ociVersion"), config.get("ociVersion"), self.runtime.name)
            for key, value in pod_network_sysctls(spec).items():
                set_sysctl(key, value)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
            stdio = ProcessStdio(terminal, want_stdin)
            init = Process(container_id, "", stdio)
            pid_file = os.path.join(bundle, "init.pid")
            since = self._reaper.mark()
            t0 = time.monotonic()
            pty = self.runtime.create(container_id, bundle, pid_file, stdio.runtime_stdio(),
                                      self._console_socket() if terminal else None)
            log.debug("timing runtime=%s create=%s took=%.3f", self.runtime.name, container_id,
                      time.monotonic() - t0)
            stdio.spawned(pty)
            cgroup = cgroups.container_dir(self._cgroup_root, config)
            # in a pid namespace it does not own, the init's end does not end the rest (as the runc
            # shim does for shareProcessNamespace pods): kill them, or they hold its stdio open
            shared_pid = any(ns.get("type") == "pid" and ns.get("path") for ns in config["linux"]["namespaces"])
            init.follow(self._reaper, read_pid_file(pid_file), since,
                        before_exit=(lambda: cgroups.kill_all(cgroup)) if shared_pid else None)
        except BaseException:
            if stdio is not None:
                stdio.close()
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        c = Container(container_id, bundle, init, cgroup, storages)
        with self._lock:
            self._containers[container_id] = c
        return c

    def _pod_init_pid(self, spec: dict[str, Any], container_id: str) -> int:
        """The guest pid of the running init of this container's pod sandbox container (whose ipc,
        uts and pid namespaces the pod's containers share), or 0."""
        sandbox_id = pod_sandbox_id(spec)
        if not sandbox_id or sandbox_id == container_id:
            return 0
        with self._lock:
            sandbox = self._containers.get(sandbox_id)
        if sandbox is None or sandbox.init.exited:
            return 0
        return sandbox.init.pid

    def start(self, container_id: str) -> None:
        """Raises NotFound, FailedPrecondition (not in created state) or Internal."""
        c = self.get(container_id)
        c.require(State.CREATED, action="start")
        self.runtime.start(container_id)
        c.started = True

    def exec(self, container_id: str, exec_id: str, process: dict[str, Any], terminal: bool,
             want_stdin: bool) -> Process:
        """Start an extra process in a running container. Raises NotFound, AlreadyExists,
        FailedPrecondition (container not running), InvalidArgument or Internal."""
        validate_id(exec_id, "exec_id")
        c = self.get(container_id)
        c.require(State.RUNNING, action="exec in")
        if exec_id in c.execs:
            raise AlreadyExists(f"exec {exec_id} of container {container_id}: already exists")
        proc_json = exec_process(process, terminal)
        stdio = ProcessStdio(terminal, want_stdin)
        p = Process(container_id, exec_id, stdio)
        c.execs[exec_id] = p  # reserve the id before the (slow) runtime call
        base = os.path.join(c.bundle, f"exec-{exec_id}")
        try:
            with open(base + ".json", "w") as f:
                json.dump(proc_json, f)
            since = self._reaper.mark()
            pty = self.runtime.exec(container_id, base + ".json", base + ".pid", base + ".log",
                                    stdio.runtime_stdio(), self._console_socket() if terminal else None)
            stdio.spawned(pty)
            p.follow(self._reaper, read_pid_file(base + ".pid"), since)
        except BaseException:
            stdio.close()
            del c.execs[exec_id]
            raise
        return p

    def signal(self, container_id: str, exec_id: str, sig: int, all_processes: bool) -> None:
        """Raises NotFound (unknown, or process already finished) or Internal."""
        p = self.process(container_id, exec_id)
        if all_processes and not exec_id:
            if p.exited:
                raise NotFound(f"{p.label}: process already finished")
            self.runtime.kill(container_id, sig, all_processes=True)
        else:
            p.signal(sig)

    def wait(self, container_id: str, exec_id: str) -> int:
        """Block until the process exits and return its code (128+signal if killed).

        A waited exec is forgotten (like Kata): its stdin closes and its output fds close once read to
        EOF, so probes exec'd every few seconds do not pile up fds. Raises NotFound.
        """
        p = self.process(container_id, exec_id)
        status = p.wait()
        assert status is not None
        if exec_id:
            c = self.get(container_id)
            if c.execs.pop(exec_id, None) is not None:
                p.stdio.retire()
        return status

    def pause(self, container_id: str) -> None:
        c = self.get(container_id)
        c.require(State.RUNNING, action="pause")
        self.runtime.pause(container_id)
        c.paused = True

    def resume(self, container_id: str) -> None:
        c = self.get(container_id)
        c.require(State.PAUSED, action="resume")
        self.runtime.resume(container_id)
        c.paused = False

    def remove(self, container_id: str, timeout: float | None) -> Container:
        """Kill everything, wait for the init (up to `timeout`, None = forever), delete it from the
        runtime, remove the bundle, unmount the container's storages and drop its pod volume
        references (a volume goes with its last user). Returns the container.

        Raises NotFound, or Internal if it will not die or the runtime refuses.
        """
        c = self.get(container_id)
        if not c.init.exited:
            if c.paused:  # a frozen cgroup cannot act on SIGKILL
                self.runtime.resume(container_id)
                c.paused = False
            try:
                self.runtime.kill(container_id, 9, all_processes=True)
            except Internal:
                # The init may have exited between the check and the kill; if not, kill it directly.
                if not c.init.exited:
                    c.init.signal(9)
            if c.init.wait(timeout) is None:
                raise Internal(f"container {container_id}: init still running after {timeout}s")
        self.runtime.delete(container_id)
        with self._lock:
            self._containers.pop(container_id, None)
        c.init.stdio.close()
        for p in c.execs.values():
            p.stdio.close()
        shutil.rmtree(c.bundle, ignore_errors=True)
        try:
            for m in reversed(c.storages):
                unmount_storage(m)
        finally:  # the container is gone either way: so is its share of the pod volumes
            self.volumes.release(container_id)
        return c


def set_sysctl(key: str, value: str, proc_sys: str = "/proc/sys") -> None:
    """Set a (checked: agent/spec.py pod_network_sysctls) sysctl in the agent's own namespaces.
    Raises InvalidArgument when the kernel has no such key, Internal when it refuses the value."""
    path = os.path.join(proc_sys, *key.split("."))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)  # never creates
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise InvalidArgument(f"linux.sysctl {key}: no such sysctl in the guest kernel") from None
    except OSError as e:
        raise Internal(f"linux.sysctl {key}={value}: {e}") from e
