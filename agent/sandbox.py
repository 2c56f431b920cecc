"""The sandbox: guest identity, sandbox-wide storages and the container set, created and destroyed
as a whole."""

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from agent.containers import Containers
from agent.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from agent.reaper import Reaper
from agent.storage import Mounted, StorageSpec, mount_storage, unmount_storage

# Legacy xtables: unlike nf_tables the kernel never asks for these itself ("Table does not exist (do
# you need to insmod?)"), so iptables-legacy (istio-init, older CNI plugins, kube-proxy images) would
# fail where the host's kernel has them loaded. Loaded once per VM, for the first container that may
# use them (CAP_NET_ADMIN): a pod without one never pays the modprobe.
LEGACY_NETFILTER_MODULES = (
    "iptable_filter", "iptable_nat", "iptable_mangle", "iptable_raw",
    "ip6table_filter", "ip6table_nat", "ip6table_mangle", "ip6table_raw", "ebtable_filter", "ebtable_nat",
)


def may_use_netfilter(spec: dict[str, Any]) -> bool:
    """Whether the container's process holds CAP_NET_ADMIN (privileged containers do)."""
    caps = ((spec.get("process") or {}).get("capabilities") or {})
    return isinstance(caps, dict) and any(
        isinstance(caps.get(kind), list) and "CAP_NET_ADMIN" in caps[kind] for kind in ("effective", "bounding"))


@dataclass(frozen=True)
class SandboxSpec:
    """Our copy of CreateSandboxRequest."""

    sandbox_id: str = ""
    hostname: str = ""
    dns: list[str] = field(default_factory=list)
    storages: list[StorageSpec] = field(default_factory=list)
    kernel_modules: list[tuple[str, list[str]]] = field(default_factory=list)
    machine_id: str = ""


class Sandbox:
    """Owns the sandbox storages; `guest=True` also lets it set the hostname, DNS, machine id and
    load modules (never on a host running the agent for tests)."""

    def __init__(self, root: str, containers: Containers, reaper: Reaper, guest: bool) -> None:
        self.root = root
        self.containers = containers
        self._reaper = reaper
        self._guest = guest
        self._lock = threading.Lock()  # guards _created and _storages
        self._created = False
        self._storages: list[Mounted] = []
        self._netfilter_loaded = False  # guarded by _lock

    def prepare_for(self, spec: dict[str, Any]) -> None:
        """What the VM's kernel needs before this container runs: the legacy netfilter tables for a
        container with CAP_NET_ADMIN (once). A module that will not load is logged, never fatal: the
        container may never use it."""
        if not self._guest or not may_use_netfilter(spec):
            return
        with self._lock:
            if self._netfilter_loaded:
                return
            self._netfilter_loaded = True
        try:
            done = self._reaper.run(["modprobe", "-a", "-q", *LEGACY_NETFILTER_MODULES])
        except (OSError, TimeoutError) as e:
            logging.getLogger("agent").warning("modprobe legacy netfilter tables: %s", e)
            return
        if done.code != 0:
            logging.getLogger("agent").warning(
                "modprobe legacy netfilter tables: %s", done.stderr.decode(errors="replace").strip())

    def create(self, spec: SandboxSpec) -> None:
        """Raises AlreadyExists (twice), InvalidArgument (bad storage) or Internal (mount/module).
        Storages mounted before a failure are unmounted again."""
        if spec.machine_id and not all(c in "0123456789abcdef" for c in spec.machine_id):
            raise InvalidArgument(f"machine_id: {spec.machine_id!r} is not lowercase hex")
        with self._lock:
            if self._created:
                raise AlreadyExists("sandbox: already created")
            mounted: list[Mounted] = []
            try:
                if self._guest:
                    self._apply_identity(spec)
                for i, s in enumerate(spec.storages):
                    mounted.append(mount_storage(s, self.root, f"storages[{i}]"))
            except BaseException:
                for m in reversed(mounted):
                    unmount_storage(m)
                raise
            self._storages = mounted
            self._created = True

    def destroy(self, timeout: float = 10.0) -> None:
        """Remove every container, then unmount the sandbox storages. Raises FailedPrecondition if
        no sandbox exists, Internal if a container or mount resists."""
        with self._lock:
            if not self._created:
                raise FailedPrecondition("sandbox: not created")
            for c in self.containers.all():
                self.containers.remove(c.id, timeout)
            for m in reversed(self._storages):
                unmount_storage(m)
            self._storages = []
            self._created = False

    def _apply_identity(self, spec: SandboxSpec) -> None:
        try:
            if spec.hostname:
                socket.sethostname(spec.hostname)
            if spec.machine_id:
                with open("/etc/machine-id", "w") as f:
                    f.write(spec.machine_id + "\n")
            if spec.dns:
                with open("/etc/resolv.conf", "w") as f:
                    f.writelines(line + "\n" for line in spec.dns)
        except OSError as e:
            raise Internal(f"sandbox identity: {e}") from e
        for name, params in spec.kernel_modules:
            done = self._reaper.run(["modprobe", name, *params])
            if done.code != 0:
                raise Internal(f"modprobe {name}: {done.stderr.decode(errors='replace').strip()}")
