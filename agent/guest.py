"""Guest-wide operations: CPU/memory onlining, details, clock and entropy. Paths are parameters so
tests can point them at a fake sysfs."""

import fcntl
import glob
import os
import struct
import time
from dataclasses import dataclass

from agent.errors import Internal, InvalidArgument

SYS_CPU = "/sys/devices/system/cpu"
SYS_MEMORY = "/sys/devices/system/memory"
CPU_RETRIES = 100  # like Kata: up to 100 x 50 ms for hot-added vCPUs to show up
CPU_RETRY_DELAY = 0.05

# linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


@dataclass(frozen=True)
class Details:
    mem_block_size_bytes: int
    online_cpus: int
    mem_total_bytes: int
    kernel_release: str


def _online_files(pattern: str, offline_value: str) -> list[str]:
    out = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path) as f:
                if f.read().strip() == offline_value:
                    out.append(path)
        except OSError:
            continue
    return out


def count_online_cpus(sys_cpu: str = SYS_CPU) -> int:
    """CPUs listed in `online` (e.g. "0-2,4")."""
    try:
        with open(os.path.join(sys_cpu, "online")) as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def online_cpus(sys_cpu: str = SYS_CPU) -> int:
    """Write 1 to every offline cpuN/online; return how many were onlined.

    Raises Internal if the kernel refuses one.
    """
    done = 0
    for path in _online_files(os.path.join(sys_cpu, "cpu[0-9]*", "online"), "0"):
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as e:
            raise Internal(f"online {path}: {e}") from e
        done += 1
    return done


def online_memory(sys_memory: str = SYS_MEMORY) -> int:
    """Online every offline memory block as movable (so virtio-mem/pc-dimm can shrink later)."""
    done = 0
    for path in _online_files(os.path.join(sys_memory, "memory[0-9]*", "state"), "offline"):
        try:
            with open(path, "w") as f:
                f.write("online_movable")
        except OSError:
            # Blocks next to kernel memory cannot be movable: fall back to a plain online.
            try:
                with open(path, "w") as f:
                    f.write("online")
            except OSError as e:
                raise Internal(f"online {path}: {e}") from e
        done += 1
    return done


def online_cpu_mem(nb_cpus: int, cpu_only: bool, sys_cpu: str = SYS_CPU, sys_memory: str = SYS_MEMORY,
                   retries: int = CPU_RETRIES, delay: float = CPU_RETRY_DELAY) -> tuple[int, int]:
    """Online hot-added CPUs (and memory unless `cpu_only`); return (online cpus, MemTotal bytes).

    With nb_cpus > 0, retry until that many CPUs are online (hot-added vCPUs appear 100-200 ms after
    the QMP call); sleeps between tries because a busy loop starves ACPI hotplug under TCG.
    Raises Internal when they never appear.
    """
    for _ in range(max(1, retries)):
        online_cpus(sys_cpu)
        if nb_cpus == 0 or count_online_cpus(sys_cpu) >= nb_cpus:
            break
        time.sleep(delay)
    else:
        raise Internal(f"only {count_online_cpus(sys_cpu)} of {nb_cpus} cpus came online")
    if not cpu_only:
        online_memory(sys_memory)
    return count_online_cpus(sys_cpu), mem_total_bytes()


def mem_total_bytes(meminfo: str = "/proc/meminfo") -> int:
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def details(sys_cpu: str = SYS_CPU, sys_memory: str = SYS_MEMORY) -> Details:
    try:
        with open(os.path.join(sys_memory, "block_size_bytes")) as f:
            block = int(f.read().strip(), 16)
    except (OSError, ValueError):
        block = 0  # no memory hotplug support in this kernel
    return Details(block, count_online_cpus(sys_cpu), mem_total_bytes(), os.uname().release)


def set_time(sec: int, usec: int) -> None:
    """Set CLOCK_REALTIME. Raises InvalidArgument for a bad value, Internal if the kernel refuses."""
    if sec < 0 or not 0 <= usec < 1_000_000:
        raise InvalidArgument(f"sec/usec: invalid time {sec}.{usec:06d}")
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, sec * 1_000_000_000 + usec * 1000)
    except OSError as e:
        raise Internal(f"clock_settime: {e}") from e


def reseed_random(data: bytes, device: str = "/dev/urandom") -> None:
    """Mix `data` into the kernel pool, credit it as entropy and force a CRNG reseed, so template
    clones stop sharing their random state. Raises Internal if the ioctls fail."""
    if not data:
        raise InvalidArgument("data: no entropy given")
    try:
        fd = os.open(device, os.O_WRONLY)
        try:
            os.write(fd, data)
            # struct rand_pool_info { int entropy_count (bits); int buf_size; __u32 buf[]; }
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as e:
        raise Internal(f"reseed {device}: {e}") from e
