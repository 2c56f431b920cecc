"""Pure VM sizing: how many vCPUs and how much memory a sandbox VM needs for its containers.

Policy (from Kata's "sandbox manages VM resources" commit and `calculateSandboxCPUs/Memory`):

* The VM boots with `default_vcpus` and `default_memory_mib`; those are reserved for the guest kernel,
  the agent and containers without limits. Containers' limits are *added* on top.
* Only running containers count: a stopped container's resources are given back ("do not hot add again
  non-running containers resources"). A created-but-not-started container counts as running, like
  Kata, where only `StateStopped` is skipped; the caller decides what `running` means.
* vCPUs: each container contributes milli-CPUs = quota * 1000 // period (only when both are > 0; quota
  -1 is unlimited and contributes nothing). The sum is rounded up to whole vCPUs *once*, so two
  containers of 0.5 CPU add 1 vCPU, not 2.
* cpuset fallback: when the sum of milli-CPUs is 0 (no running container has a usable quota), the
  containers may still be constrained by cpusets only; then the VM gets one extra vCPU per CPU in each
  running container's cpuset, *summed* over containers (not their union), exactly as the seed does. A
  pod whose containers are pinned to the same two host CPUs therefore gets 4 extra vCPUs: wasteful, but
  never too few, and it is the behaviour users of Kata expect.
* Memory: each running container's limit is added; None, 0 and -1 mean unlimited and add nothing (the
  seed adds -1 bytes for an unlimited limit; we don't). The *added* amount is rounded up to the memory
  block size, because memory is hot-plugged in whole blocks (DIMMs of `memory_block_mib`); the boot
  memory itself is not rounded.
* Bounds: the result is clamped to [default, max]. A request above max is never an error: it is
  clamped and reported in `Target.clamped`, which the caller turns into a warning event. For memory,
  max is rounded *down* to the block grid so the target stays pluggable.
* Swap: see `_container_swap_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20

# Linux's NR_CPUS tops out at 8192; a larger CPU number in a cpuset is a typo or an attack ("0-4000000000"
# would otherwise build a huge set), so the parser refuses it.
MAX_CPU_ID = 8191

# OCI integers are int64 (quota, limit, swap) or uint64 (period, swappiness) on the wire.
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1


# --------------------------------------------------------------------------------------------- cpusets


def parse_cpuset(text: str) -> frozenset[int]:
    """Parse a Linux cpu list such as ``"0-3,5"`` (whitespace and a trailing newline tolerated).

    The empty string is the empty set (no cpuset constraint). Raises ValueError on anything else that
    is not a comma-separated list of ``N`` or ``N-M`` with ``N <= M <= MAX_CPU_ID``.
    """
    if not isinstance(text, str):
        raise ValueError(f"cpuset must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        return frozenset()
    cpus: set[int] = set()
    for item in stripped.split(","):
        item = item.strip()
        lo_text, sep, hi_text = item.partition("-")
        lo = _cpu_id(lo_text, text)
        hi = _cpu_id(hi_text, text) if sep else lo
        if hi < lo:
            raise ValueError(f"invalid cpuset {text!r}: range {item!r} is reversed")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def _cpu_id(part: str, whole: str) -> int:
    part = part.strip()
    # ASCII digits only: int() would also accept "+1", "1_0" and non-ASCII digits.
    if not (part.isascii() and part.isdecimal()):
        raise ValueError(f"invalid cpuset {whole!r}: {part!r} is not a CPU number")
    cpu = int(part)
    if cpu > MAX_CPU_ID:
        raise ValueError(f"invalid cpuset {whole!r}: CPU {cpu} exceeds {MAX_CPU_ID}")
    return cpu


def format_cpuset(cpus: Iterable[int]) -> str:
    """Canonical Linux cpu list: sorted, ranges merged (``{0,1,2,3,5}`` -> ``"0-3,5"``)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


# ------------------------------------------------------------------------------------ container input


@dataclass(frozen=True)
class ContainerResources:
    """The part of a container's OCI ``linux.resources`` that sizes the VM.

    None means "not set". -1 means unlimited for `cpu_quota`, `memory_limit` and `memory_swap`.
    `memory_swap` is OCI's memory.swap, i.e. memory + swap, as runc and cgroup v1's memsw understand it.
    """

    cpu_quota: int | None = None
    cpu_period: int | None = None
    cpuset_cpus: str = ""
    memory_limit: int | None = None
    memory_swap: int | None = None
    swappiness: int | None = None

    def __post_init__(self) -> None:
        _check_int("cpu.quota", self.cpu_quota, -1, _INT64_MAX)
        _check_int("cpu.period", self.cpu_period, 0, _UINT64_MAX)
        _check_int("memory.limit", self.memory_limit, -1, _INT64_MAX)
        _check_int("memory.swap", self.memory_swap, -1, _INT64_MAX)
        _check_int("memory.swappiness", self.swappiness, 0, 100)
        if not isinstance(self.cpuset_cpus, str):
            raise ValueError(f"cpu.cpus: expected a string, got {type(self.cpuset_cpus).__name__}")
        try:
            parse_cpuset(self.cpuset_cpus)
        except ValueError as exc:
            raise ValueError(f"cpu.cpus: {exc}") from None

    @classmethod
    def from_oci(cls, linux_resources: Mapping[str, Any] | None) -> ContainerResources:
        """Build from the JSON form of OCI ``LinuxResources`` (``spec["linux"]["resources"]``).

        Fields we don't size on (shares, mems, devices, ...) are ignored. Raises ValueError naming the
        offending field (``"memory.limit: expected an integer, got 'x'"``).
        """
        if linux_resources is None:
            return cls()
        if not isinstance(linux_resources, Mapping):
            raise ValueError(f"resources: expected an object, got {type(linux_resources).__name__}")
        cpu = _section(linux_resources, "cpu")
        memory = _section(linux_resources, "memory")
        cpus = cpu.get("cpus")
        if cpus is not None and not isinstance(cpus, str):
            raise ValueError(f"cpu.cpus: expected a string, got {cpus!r}")
        return cls(
            cpu_quota=_json_int(cpu, "cpu", "quota"),
            cpu_period=_json_int(cpu, "cpu", "period"),
            cpuset_cpus=cpus or "",
            memory_limit=_json_int(memory, "memory", "limit"),
            memory_swap=_json_int(memory, "memory", "swap"),
            swappiness=_json_int(memory, "memory", "swappiness"),
        )

    @property
    def milli_cpus(self) -> int:
        """quota * 1000 // period when both are > 0, else 0 (unlimited or unset adds no vCPU)."""
        if self.cpu_quota and self.cpu_period and self.cpu_quota > 0 and self.cpu_period > 0:
            return self.cpu_quota * 1000 // self.cpu_period
        return 0

    @property
    def memory_limit_bytes(self) -> int:
        """The memory limit, or 0 when unlimited (None, 0 or -1)."""
        return self.memory_limit if self.memory_limit and self.memory_limit > 0 else 0


def _section(resources: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = resources.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: expected an object, got {type(value).__name__}")
    return value


def _json_int(section: Mapping[str, Any], prefix: str, key: str) -> int | None:
    value = section.get(key)
    # bool is an int subclass in Python; JSON true is not a number.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{prefix}.{key}: expected an integer, got {value!r}")
    return value


def _check_int(name: str, value: int | None, lo: int, hi: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: {value} is outside [{lo}, {hi}]")


def merge_update(old: ContainerResources, new: ContainerResources) -> ContainerResources:
    """Apply an UpdateTask's resources on top of the current ones.

    An update carries only what changes. Quota, period, memory limit and memory+swap given as None *or
    0* keep the old value (seed: "if cpu and quota are nil or 0 we dont update them", otherwise the
    sandbox would remove vCPUs the container still uses; 0 is not a valid value for any of them anyway).
    An empty cpuset keeps the old one. Swappiness keeps the old value only when None, since 0 is a real
    swappiness. To lift a limit, send -1.
    """

    def pick(old_value: int | None, new_value: int | None) -> int | None:
        return old_value if not new_value else new_value

    return ContainerResources(
        cpu_quota=pick(old.cpu_quota, new.cpu_quota),
        cpu_period=pick(old.cpu_period, new.cpu_period),
        cpuset_cpus=new.cpuset_cpus or old.cpuset_cpus,
        memory_limit=pick(old.memory_limit, new.memory_limit),
        memory_swap=pick(old.memory_swap, new.memory_swap),
        swappiness=old.swappiness if new.swappiness is None else new.swappiness,
    )


# ------------------------------------------------------------------------------------------ sizing


@dataclass(frozen=True)
class SandboxSizing:
    """The hypervisor part of the runtime config that bounds the VM's size."""

    default_vcpus: int = 1
    max_vcpus: int = 1
    default_memory_mib: int = 2048
    max_memory_mib: int = 2048
    memory_block_mib: int = 128
    guest_swap: bool = False

    def __post_init__(self) -> None:
        if self.default_vcpus < 1:
            raise ValueError(f"default_vcpus: {self.default_vcpus} must be >= 1")
        if self.max_vcpus < self.default_vcpus:
            raise ValueError(f"max_vcpus: {self.max_vcpus} is below default_vcpus {self.default_vcpus}")
        if self.default_memory_mib < 1:
            raise ValueError(f"default_memory_mib: {self.default_memory_mib} must be >= 1")
        if self.max_memory_mib < self.default_memory_mib:
            raise ValueError(
                f"max_memory_mib: {self.max_memory_mib} is below default_memory_mib {self.default_memory_mib}"
            )
        if self.memory_block_mib < 1:
            raise ValueError(f"memory_block_mib: {self.memory_block_mib} must be >= 1")

    @property
    def max_pluggable_memory_mib(self) -> int:
        """max_memory_mib rounded down so that (value - default) is a whole number of blocks."""
        room = self.max_memory_mib - self.default_memory_mib
        return self.default_memory_mib + room // self.memory_block_mib * self.memory_block_mib


@dataclass(frozen=True)
class Target:
    """What the VM should look like. `clamped` holds one human-readable line per bound that was hit."""

    vcpus: int
    memory_mib: int
    swap_bytes: int = 0
    clamped: tuple[str, ...] = field(default=(), compare=False)


def calculate_sandbox(containers: Iterable[tuple[ContainerResources, bool]], cfg: SandboxSizing) -> Target:
    """Size the VM for `containers`, given as ``(resources, running)`` pairs. Never raises on big asks."""
    running = [res for res, is_running in containers if is_running]

    milli = sum(res.milli_cpus for res in running)
    if milli == 0:
        extra_vcpus = sum(len(parse_cpuset(res.cpuset_cpus)) for res in running)
    else:
        extra_vcpus = math.ceil(milli / 1000)
    want_vcpus = cfg.default_vcpus + extra_vcpus

    limit_bytes = sum(res.memory_limit_bytes for res in running)
    extra_mib = math.ceil(limit_bytes / MIB)
    extra_mib = math.ceil(extra_mib / cfg.memory_block_mib) * cfg.memory_block_mib
    want_memory = cfg.default_memory_mib + extra_mib

    clamped: list[str] = []
    vcpus = min(want_vcpus, cfg.max_vcpus)
    if vcpus < want_vcpus:
        clamped.append(f"vCPUs: containers need {want_vcpus}, clamped to max_vcpus {cfg.max_vcpus}")
    memory = min(want_memory, cfg.max_pluggable_memory_mib)
    if memory < want_memory:
        clamped.append(
            f"memory: containers need {want_memory} MiB, clamped to {memory} MiB "
            f"(max_memory_mib {cfg.max_memory_mib}, blocks of {cfg.memory_block_mib} MiB)"
        )

    swap = 0
    if cfg.guest_swap:
        per_container = [_container_swap_bytes(res) for res in running]
        swap = sum(b for b in per_container if b is not None)
        if any(b is None for b in per_container):
            swap += cfg.default_memory_mib * MIB
    return Target(vcpus=vcpus, memory_mib=memory, swap_bytes=swap, clamped=tuple(clamped))


def _container_swap_bytes(res: ContainerResources) -> int | None:
    """Guest swap this container asks for; None means "needs pod swap" (sized as the boot memory, once).

    Only containers with swappiness > 0 use swap at all. Then, as in the seed:
    * memory.swap unset and a memory limit L: the container may swap L bytes (runc's default of
      memory+swap = 2L);
    * memory.swap unset and no limit: the container needs "pod swap", and the sandbox adds its default
      memory size once, however many containers need it;
    * memory.swap S > L: S - L bytes of swap.
    Where we depart from the seed, which looks wrong:
    * the seed *assigns* ``swapSandbox = S - L`` instead of adding, so the last such container
      overwrites the sum of the others; we add;
    * the seed treats an unlimited limit (-1) as a number and adds -1 bytes; we treat -1 like unset;
    * the seed gives nothing to memory.swap = -1 (unlimited swap); we treat it like unset, which is the
      most a VM with a finite swap device can honour;
    * S <= L (a swap smaller than the limit, which runc refuses anyway) asks for no swap, as in the seed.
    """
    if not res.swappiness:
        return 0
    limit = res.memory_limit_bytes
    swap = res.memory_swap if res.memory_swap and res.memory_swap > 0 else 0
    if swap == 0:
        return limit if limit else None
    return max(swap - limit, 0)
