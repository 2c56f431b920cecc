"""Host cgroups for a sandbox: pure planning (`plan_cgroups`, `sandbox_cpu_limits`) and a thin applier
(`CgroupManager`) that writes the plan under /sys/fs/cgroup.

Layout (Kata's `sandbox_cgroup_only`), for a sandbox whose pause container has ``linux.cgroupsPath``
``<pod>/<name>``; like Kata we rename the leaf to ``kata_<name>`` so cAdvisor does not mistake our
cgroup for the container's and double-count it:

* ``sandbox_cgroup_only = true`` (v1 and v2): one cgroup ``<pod>/kata_<name>``. The shim joins it before
  starting QEMU, so QEMU and every thread of the pod live there, under the sandbox's CPU quota and
  cpuset. Simple, and the pod pays for its own overhead.
* ``sandbox_cgroup_only = false`` on cgroup v1 (Kata's original layout): the sandbox cgroup
  ``<pod>/kata_<name>`` holds only the vCPU threads and carries the quota/cpuset; the shim and QEMU (its
  I/O and main-loop threads) go to an unconstrained overhead cgroup ``/kata_overhead/<sandbox-id>``.
  v1 lets single threads (the ``tasks`` file) move anywhere.
* ``sandbox_cgroup_only = false`` on cgroup v2: a thread can only move between cgroups of its process's
  *threaded subtree* (kernel cgroup-v2.rst, "Threads"): the target must be a ``threaded`` cgroup below
  the process's threaded-domain cgroup, and only threaded controllers (cpu, cpuset, pids, perf_event)
  work there. So the vCPU threads cannot leave for an overhead cgroup elsewhere in the tree. We build:
  ``<pod>/kata_<name>`` (the domain: the shim and QEMU join it through ``cgroup.procs``; it turns into
  "domain threaded"), with two threaded children, ``vcpus`` (quota and cpuset, vCPU threads) and
  ``overhead`` (everything else of QEMU, unconstrained). Moving QEMU's main thread to ``overhead``
  means threads it creates later (hot-plugged vCPUs) start there, as in Kata, and are moved to
  ``vcpus`` on the next `constrain_vcpus`. The price: the overhead stays inside the pod's cgroup, so
  the pod-level limits kubelet sets still cover it. memory/io are domain controllers and stay at
  ``kata_<name>`` (set by kubelet on the pod cgroup above it).

The planner never touches the file system; the applier does only what the plan says, and `delete`
removes what we created (leaf first, after moving any leftover process to the nearest ancestor that
accepts it), idempotently.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import math
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from shim.resources.sizing import ContainerResources, format_cpuset, parse_cpuset

CGROUP_MOUNT = "/sys/fs/cgroup"
# The CFS period we express the sandbox quota in (the kernel's and runc's default).
DEFAULT_PERIOD_US = 100_000
# The kernel refuses a CFS quota below 1 ms.
MIN_QUOTA_US = 1_000
# v1 hierarchies we manage, as Kata's V1Constraints (cpuacct is co-mounted with cpu on most hosts).
V1_CONTROLLERS = ("cpu", "cpuset")
# v2 controllers we enable for the sandbox cgroup; both are threaded controllers.
V2_CONTROLLERS = ("cpu", "cpuset")
KATA_PREFIX = "kata_"
OVERHEAD_ROOT = "/kata_overhead"


class CgroupVersion(enum.Enum):
    V1 = 1
    V2 = 2


def detect_version(mount: str = CGROUP_MOUNT) -> CgroupVersion:
    """V2 when `mount` is a unified hierarchy (it has cgroup.controllers), else V1 (legacy or hybrid)."""
    return CgroupVersion.V2 if os.path.exists(os.path.join(mount, "cgroup.controllers")) else CgroupVersion.V1


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class CpuLimits:
    """What the sandbox cgroup gets: CFS quota per period (None = unlimited) and cpuset ("" = inherit)."""

    quota_us: int | None = None
    period_us: int = DEFAULT_PERIOD_US
    cpus: str = ""

    @property
    def cpu_max(self) -> str:
        """The v2 ``cpu.max`` line."""
        return f"{'max' if self.quota_us is None else self.quota_us} {self.period_us}"


def sandbox_cpu_limits(
    containers: Iterable[tuple[ContainerResources, bool]], period_us: int = DEFAULT_PERIOD_US
) -> CpuLimits:
    """CPU limits of the sandbox cgroup from its *workload* containers, as ``(resources, running)``.

    Leave the pause container out (the seed skips the PodSandbox container too). Policy:
    * quota: the running containers' milli-CPUs summed and expressed over one `period_us` (at least
      1 ms). The seed sums raw quotas and takes the largest period, which is wrong when periods differ
      (0.5 CPU over 100 ms plus 0.5 CPU over 20 ms gave 0.6 CPU, not 1); it also added -1 for an
      unlimited container. We follow kubelet's pod-level rule instead: if any running container is
      unlimited (no quota, -1, or a quota below one milli-CPU), the sandbox is unlimited too, otherwise
      that container would be starved by its neighbours' limits. No running container: unlimited.
    * cpuset: the union of the running containers' cpusets (as the seed's getSandboxCPUSet), or no
      constraint if any running container has none, for the same reason.
    """
    running = [res for res, is_running in containers if is_running]
    if not running or any(res.milli_cpus == 0 for res in running):
        quota = None
    else:
        milli = sum(res.milli_cpus for res in running)
        quota = max(math.ceil(milli * period_us / 1000), MIN_QUOTA_US)
    sets = [parse_cpuset(res.cpuset_cpus) for res in running]
    cpus = "" if not sets or any(not s for s in sets) else format_cpuset(frozenset().union(*sets))
    return CpuLimits(quota_us=quota, period_us=period_us, cpus=cpus)


def cgroup_path_from_oci(cgroups_path: str) -> str:
    """Turn OCI ``linux.cgroupsPath`` into a path below the cgroup mount (``/a/b``).

    Accepts a plain path (``/kubepods/burstable/pod1/abc``; relative ones are taken from the root) and
    systemd's ``slice:prefix:name`` form, which runc expands as
    ``/kubepods.slice/kubepods-burstable.slice/<slice>/<prefix>-<name>.scope``. We do not talk to
    systemd: the directories are created directly, which systemd tolerates below a delegated slice.
    Raises ValueError on an empty path or one that climbs with "..".
    """
    if not cgroups_path.strip():
        raise ValueError("cgroupsPath is empty")
    if not cgroups_path.startswith("/") and cgroups_path.count(":") == 2:
        parent_slice, prefix, name = cgroups_path.split(":")
        parts = [*_expand_slice(parent_slice or "-.slice"), f"{prefix}-{name}.scope" if prefix else name]
    else:
        parts = [p for p in cgroups_path.split("/") if p and p != "."]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"invalid cgroupsPath {cgroups_path!r}")
    return "/" + "/".join(parts)


def _expand_slice(slice_name: str) -> list[str]:
    """``a-b-c.slice`` -> ``[a.slice, a-b.slice, a-b-c.slice]``; ``-.slice`` is the root."""
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise ValueError(f"invalid systemd slice {slice_name!r}")
    stem = slice_name.removesuffix(".slice")
    if stem == "-":
        return []
    words = stem.split("-")
    if not all(words):
        raise ValueError(f"invalid systemd slice {slice_name!r}")
    return ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]


@dataclass(frozen=True)
class CgroupPlan:
    """Where things go. All paths are below the cgroup mount (and below each v1 hierarchy)."""

    version: CgroupVersion
    process: str  # the shim and QEMU join this one through cgroup.procs
    sandbox: str  # carries the CPU limits; the vCPU threads end up here
    overhead: str | None  # the rest of QEMU when it is split from the vCPUs (sandbox_cgroup_only=false)
    threaded: tuple[str, ...]  # v2 cgroups made "threaded"
    owned: tuple[str, ...]  # what we create and delete, parents before children

    @property
    def split(self) -> bool:
        """True when the vCPU threads are separated from the rest of QEMU."""
        return self.overhead is not None


def plan_cgroups(
    cgroups_path: str, sandbox_id: str, *, version: CgroupVersion, sandbox_cgroup_only: bool
) -> CgroupPlan:
    """Plan the sandbox's cgroups (see the module docstring). Raises ValueError on a bad path or id."""
    if not sandbox_id or "/" in sandbox_id or sandbox_id in (".", ".."):
        raise ValueError(f"invalid sandbox id {sandbox_id!r}")
    path = cgroup_path_from_oci(cgroups_path)
    parent, name = posixpath.split(path)
    sandbox = posixpath.join(parent, KATA_PREFIX + name)
    if sandbox_cgroup_only:
        return CgroupPlan(version, sandbox, sandbox, None, (), (sandbox,))
    if version is CgroupVersion.V1:
        overhead = f"{OVERHEAD_ROOT}/{sandbox_id}"
        return CgroupPlan(version, overhead, sandbox, overhead, (), (sandbox, overhead))
    vcpus, overhead = f"{sandbox}/vcpus", f"{sandbox}/overhead"
    return CgroupPlan(version, sandbox, vcpus, overhead, (vcpus, overhead), (sandbox, vcpus, overhead))


# ------------------------------------------------------------------------------------------ applier


class CgroupManager:
    """Applies a `CgroupPlan` to the host. Blocking file writes: call from a thread in async code.

    `mount` is the cgroup mount: the unified hierarchy on v2, the directory of the controller
    hierarchies on v1. Methods return notes (controllers missing on this host) rather than failing
    on them; a write the kernel refuses raises OSError with the file named.
    """

    def __init__(self, plan: CgroupPlan, mount: str = CGROUP_MOUNT) -> None:
        self.plan = plan
        self.mount = mount

    # -- paths
    def _roots(self) -> list[str]:
        if self.plan.version is CgroupVersion.V2:
            return [self.mount]
        return [r for r in (os.path.join(self.mount, c) for c in V1_CONTROLLERS) if os.path.isdir(r)]

    def _dirs(self, cgroup: str) -> list[str]:
        return [root + cgroup for root in self._roots()]

    def path(self, cgroup: str, controller: str | None = None) -> str:
        """Host directory of `cgroup` (on v1, in the `controller` hierarchy)."""
        root = self.mount if controller is None else os.path.join(self.mount, controller)
        return root + cgroup

    # -- create
    def create(self) -> list[str]:
        """Create the plan's cgroups (parents as needed) and enable the CPU controllers. Idempotent."""
        notes: list[str] = []
        if self.plan.version is CgroupVersion.V1:
            for root in self._roots():
                for cgroup in self.plan.owned:
                    self._mkdir_v1(root, cgroup)
            missing = [c for c in V1_CONTROLLERS if not os.path.isdir(os.path.join(self.mount, c))]
            notes += [f"cgroup v1 controller {c!r} is not mounted" for c in missing]
            return notes
        for cgroup in self.plan.owned:
            os.makedirs(self.path(cgroup), exist_ok=True)
            if cgroup in self.plan.threaded:
                _write(self.path(cgroup) + "/cgroup.type", "threaded")
        # The limits live on plan.sandbox, so its parent must delegate cpu and cpuset to it; in the v2
        # split layout that parent is our domain cgroup, whose own parent must delegate them first.
        parents = [posixpath.dirname(self.plan.sandbox)]
        if self.plan.split:
            parents.insert(0, posixpath.dirname(self.plan.process))
        for parent in parents:
            notes += self._enable_controllers(parent)
        return notes

    def _mkdir_v1(self, root: str, cgroup: str) -> None:
        # A new v1 cpuset cgroup starts with empty cpus and mems and refuses tasks until they are set,
        # so every directory we make there inherits its parent's.
        current = root
        for part in cgroup.strip("/").split("/"):
            parent, current = current, os.path.join(current, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(current)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if os.path.exists(os.path.join(current, knob)) and not _read(os.path.join(current, knob)):
                    _write(os.path.join(current, knob), _read(os.path.join(parent, knob)))

    def _enable_controllers(self, cgroup: str) -> list[str]:
        directory = self.path(cgroup)
        available = _read(directory + "/cgroup.controllers").split()
        enabled = _read(directory + "/cgroup.subtree_control").split()
        notes = []
        for controller in V2_CONTROLLERS:
            if controller in enabled:
                continue
            if controller not in available:
                notes.append(f"cgroup v2 controller {controller!r} is not available in {cgroup}")
                continue
            _write(directory + "/cgroup.subtree_control", "+" + controller)
        return notes

    # -- limits
    def set_limits(self, limits: CpuLimits) -> list[str]:
        """Write the sandbox cgroup's CPU quota and cpuset; returns notes for files this host lacks."""
        if self.plan.version is CgroupVersion.V2:
            directory = self.path(self.plan.sandbox)
            # writing "" to a v2 cpuset.cpus means "inherit the parent's", which is what we want
            writes = {f"{directory}/cpu.max": limits.cpu_max, f"{directory}/cpuset.cpus": limits.cpus}
        else:
            cpu, cpuset = self.path(self.plan.sandbox, "cpu"), self.path(self.plan.sandbox, "cpuset")
            parent_cpus = os.path.join(posixpath.dirname(cpuset), "cpuset.cpus")
            writes = {
                # period before quota: the kernel checks quota against the current period
                f"{cpu}/cpu.cfs_period_us": str(limits.period_us),
                f"{cpu}/cpu.cfs_quota_us": str(-1 if limits.quota_us is None else limits.quota_us),
                # v1 refuses an empty cpuset for a cgroup with tasks: "no constraint" is the parent's set
                f"{cpuset}/cpuset.cpus": limits.cpus
                or (_read(parent_cpus) if os.path.exists(parent_cpus) else ""),
            }
        notes: list[str] = []
        for file, value in writes.items():
            if not os.path.exists(file):
                notes.append(f"{file} does not exist on this host: not set")
                continue
            _write(file, value)
        return notes

    # -- membership
    def add_process(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the plan's process cgroup."""
        for directory in self._dirs(self.plan.process):
            _write(directory + "/cgroup.procs", str(pid))

    def constrain_vcpus(self, pid: int, vcpu_tids: Iterable[int]) -> None:
        """Put the vCPU threads of QEMU (`pid`) in the sandbox cgroup and, on v2, its other threads
        in the overhead cgroup. Call after every vCPU hot-plug: new threads start next to their
        creator. Threads that exited meanwhile are skipped. No-op without a split layout."""
        if not self.plan.split:
            return
        vcpus = set(vcpu_tids)
        thread_file = "cgroup.threads" if self.plan.version is CgroupVersion.V2 else "tasks"
        for directory in self._dirs(self.plan.sandbox):
            for tid in sorted(vcpus):
                _write_task(directory + "/" + thread_file, tid)
        if self.plan.version is CgroupVersion.V2 and self.plan.overhead is not None:
            for tid in sorted(set(threads_of(pid)) - vcpus):
                _write_task(self.path(self.plan.overhead) + "/cgroup.threads", tid)

    # -- delete
    def delete(self) -> None:
        """Move leftover tasks out and remove every cgroup we created, leaf first. Idempotent."""
        for root in self._roots():
            for cgroup in reversed(self.plan.owned):
                directory = root + cgroup
                if not os.path.isdir(directory):
                    continue
                self._evacuate(root, cgroup)
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(directory)

    def _evacuate(self, root: str, cgroup: str) -> None:
        directory = root + cgroup
        if self.plan.version is CgroupVersion.V1:
            # v1 moves single threads anywhere: hand each to the parent
            parent = posixpath.dirname(directory)
            for tid in _read_ints(directory + "/tasks"):
                _write_task(parent + "/tasks", tid)
            return
        # v2: threads cannot leave their threaded subtree one by one; move whole processes, to the
        # nearest ancestor outside what we own that takes them (a parent with controllers enabled
        # refuses processes with EBUSY: the "no internal processes" rule; the root always accepts).
        pids = {_tgid(tid) for tid in _read_ints(directory + "/cgroup.threads")}
        ancestor = posixpath.dirname(self.plan.owned[0])
        for pid in sorted(p for p in pids if p is not None):
            target = ancestor
            while True:
                try:
                    _write_task(root + target.rstrip("/") + "/cgroup.procs", pid)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.EOPNOTSUPP) or target == "/":
                        raise
                    target = posixpath.dirname(target)


def remove_overhead_root(manager: CgroupManager) -> None:
    """Remove the shared /kata_overhead parent once the last sandbox left it (v1 split layout)."""
    if not manager.plan.split or manager.plan.version is not CgroupVersion.V1:
        return
    for root in manager._roots():
        with contextlib.suppress(OSError):  # busy or not empty: another sandbox still uses it
            os.rmdir(root + OVERHEAD_ROOT)


# ----------------------------------------------------------------------------------- file helpers


def threads_of(pid: int) -> list[int]:
    """Thread ids of process `pid` (empty if it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


def _tgid(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _read_ints(path: str) -> list[int]:
    try:
        return [int(x) for x in _read(path).split()]
    except FileNotFoundError:
        return []


def _write(path: str, value: str) -> None:
    # One write() per value: cgroup files act on each write, and buffering could split or merge them.
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise OSError(exc.errno, f"writing {value!r} to {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _write_task(path: str, tid: int) -> None:
    """Write a pid/tid to a membership file; a task that already exited (ESRCH) is not an error."""
    try:
        _write(path, str(tid))
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
