"""Checks on what the guest sends back. The guest is untrusted: a compromised or buggy agent must not
make the shim report nonsense, allocate without bound, or crash on an unexpected value.

Policy, per value:
- pids (create/exec/list): must be 1..PID_MAX_LIMIT, else `AgentBadResponse` (the call fails);
- exit statuses: anything outside 0..255 is clamped to 255 (and logged) rather than failing: a process
  did exit, and losing the exit would leave the task hanging in containerd;
- WriteStdin's accepted length: must be <= what was sent, else `AgentBadResponse`;
- output chunks: at most MAX_CHUNK bytes, else `AgentBadResponse` (the stream ends with that error);
- OOM container ids: must look like a containerd identifier, else the event is dropped (and logged),
  so one bad event cannot stop the OOM stream;
- strings and lists in GuestDetails/Version/stats: bounded length, else `AgentBadResponse`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from agent_client.errors import AgentBadResponse

log = logging.getLogger(__name__)

PID_MAX_LIMIT = 1 << 22  # the kernel's hard ceiling for pid_max on 64-bit
MAX_CHUNK = 1 << 20  # the agent reads output in 64 KiB pieces; 1 MiB leaves headroom
MAX_STRING = 256  # versions, kernel release, driver names
MAX_LIST = 1024  # storage handlers, memory.stat keys
MAX_CPUS = 4096  # more than QEMU's maxcpus on any machine type we use
MAX_BLOCK_SIZE = 1 << 40
EXIT_STATUS_CLAMP = 255
# containerd's identifier rule (pkg/identifiers): alphanumerics separated by single . _ -, at most 76.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_MAX_ID = 76


def pid(value: int, what: str) -> int:
    """Return `value` if it is a possible guest pid.

    Raises:
        AgentBadResponse: `value` is 0, negative or above PID_MAX_LIMIT.
    """
    if not 1 <= value <= PID_MAX_LIMIT:
        raise AgentBadResponse(f"guest returned impossible pid {value} for {what}")
    return value


def pids(values: Iterable[int], what: str) -> list[int]:
    """Validate every pid of a list (see `pid`).

    Raises:
        AgentBadResponse: one pid is impossible, or there are more than PID_MAX_LIMIT.
    """
    out = [pid(v, what) for v in values]
    if len(out) > PID_MAX_LIMIT:
        raise AgentBadResponse(f"guest returned {len(out)} pids for {what}")
    return out


def exit_status(value: int, what: str) -> int:
    """Return a waitpid-style status in 0..255; out-of-range values are clamped to 255. Never raises."""
    if 0 <= value <= 255:
        return value
    log.warning("guest returned exit status %d for %s; reporting %d", value, what, EXIT_STATUS_CLAMP)
    return EXIT_STATUS_CLAMP


def accepted_len(value: int, sent: int, what: str) -> int:
    """Return how many bytes the agent took.

    Raises:
        AgentBadResponse: it claims more than was sent.
    """
    if value > sent:
        raise AgentBadResponse(f"guest claims it accepted {value} of {sent} bytes for {what}")
    return value


def chunk(data: bytes, what: str) -> bytes:
    """Return an output chunk.

    Raises:
        AgentBadResponse: it is larger than MAX_CHUNK.
    """
    if len(data) > MAX_CHUNK:
        raise AgentBadResponse(f"guest sent a {len(data)}-byte output chunk for {what} (max {MAX_CHUNK})")
    return data


def container_id(value: str) -> str | None:
    """Return `value` if it is a valid container id, else None (the caller drops it). Never raises."""
    if len(value) <= _MAX_ID and _CONTAINER_ID.fullmatch(value):
        return value
    log.warning("dropping agent event with invalid container id %r", value[:_MAX_ID])
    return None


def string(value: str, what: str, limit: int = MAX_STRING) -> str:
    """Return `value` if it is at most `limit` characters.

    Raises:
        AgentBadResponse: it is longer.
    """
    if len(value) > limit:
        raise AgentBadResponse(f"guest sent a {len(value)}-character {what} (max {limit})")
    return value


def strings(values: Iterable[str], what: str) -> tuple[str, ...]:
    """Validate a bounded list of bounded strings.

    Raises:
        AgentBadResponse: too many entries, or one is too long.
    """
    out = tuple(string(v, what) for v in values)
    if len(out) > MAX_LIST:
        raise AgentBadResponse(f"guest sent {len(out)} {what} entries (max {MAX_LIST})")
    return out


def cpu_count(value: int, what: str) -> int:
    """Raises AgentBadResponse unless 0 <= value <= MAX_CPUS."""
    if not 0 <= value <= MAX_CPUS:
        raise AgentBadResponse(f"guest reported {value} CPUs for {what}")
    return value


def block_size(value: int) -> int:
    """Memory block size: 0 (not asked) or a power of two up to 1 TiB.

    Raises:
        AgentBadResponse: anything else.
    """
    if value and (value & (value - 1) or value > MAX_BLOCK_SIZE):
        raise AgentBadResponse(f"guest reported memory block size {value}")
    return value


def stat_map(values: dict[str, int], what: str) -> dict[str, int]:
    """A bounded map of bounded keys (memory.stat).

    Raises:
        AgentBadResponse: too many keys or one is too long.
    """
    if len(values) > MAX_LIST:
        raise AgentBadResponse(f"guest sent {len(values)} {what} keys (max {MAX_LIST})")
    return {string(k, what): v for k, v in values.items()}
