"""The VM follows its containers' resources: vCPU and memory hot-plug, Task Update, host cgroups (#6)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import trio
from google.protobuf import any_pb2, empty_pb2

import ttrpc
from protos.containerd.runtime.v2.task import shim_pb2
from shim.layout import socket_address, socket_path
from tests.e2e.test_ctr_vm import task_status
from tests.support.containerd import NAMESPACE, RUNTIME, PrivateContainerd
from tests.support.vmprocs import qemu_pids, wait_for
from vmm.accel import detect_accel

pytestmark = [pytest.mark.containerd, pytest.mark.vm]
MiB = 1 << 20
# vCPU hot-unplug needs KVM or multi-threaded TCG (see vmm/config.py tcg_multithread)
UNPLUG_WORKS = detect_accel("auto").name == "kvm"


def guest(ctd: PrivateContainerd, cid: str, script: str) -> str:
    guest.n += 1  # type: ignore[attr-defined]
    out = ctd.ctr("tasks", "exec", "--exec-id", f"probe{guest.n}", cid, "sh", "-c", script)  # type: ignore[attr-defined]
    return out.stdout.decode()


guest.n = 0  # type: ignore[attr-defined]


def nproc(ctd: PrivateContainerd, cid: str) -> int:
    return int(guest(ctd, cid, "nproc").strip())


def mem_total_kib(ctd: PrivateContainerd, cid: str) -> int:
    return int(re.search(r"MemTotal:\s+(\d+)", guest(ctd, cid, "cat /proc/meminfo")).group(1))


def vcpu_cgroups(qemu_pid: int) -> dict[str, str]:
    """vCPU thread name -> its cgroup in the v1 cpu hierarchy (or the v2 path)."""
    found = {}
    for tid in os.listdir(f"/proc/{qemu_pid}/task"):
        comm = Path(f"/proc/{qemu_pid}/task/{tid}/comm").read_text().strip()
        if comm.endswith(("/TCG", "/KVM")):  # "CPU 1/KVM", or "ALL CPUs/TCG" for single-threaded TCG
            lines = Path(f"/proc/{qemu_pid}/task/{tid}/cgroup").read_text().splitlines()
            cpu = next((ln for ln in lines if re.match(r"\d+:[^:]*\bcpu\b[^:]*:", ln)), lines[0])
            found[comm] = cpu.split(":", 2)[2]
    return found


def cpu_quota_us(cgroup: str) -> int:
    for root in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"):
        f = Path(root + cgroup) / "cpu.cfs_quota_us"
        if f.exists():
            return int(f.read_text())
    quota, _ = (Path("/sys/fs/cgroup" + cgroup) / "cpu.max").read_text().split()
    return -1 if quota == "max" else int(quota)


async def update_task(ctd: PrivateContainerd, sandbox: str, cid: str, resources: dict) -> None:
    """Task Update as containerd sends it (CRI's UpdateContainerResources), straight to the shim."""
    path = socket_path(socket_address(ctd.address, NAMESPACE, sandbox))
    request = shim_pb2.UpdateTaskRequest(id=cid, resources=any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=json.dumps(resources).encode()))
    async with ttrpc.open_client(path) as client:
        await client.call("containerd.task.v2.Task", "Update", request, empty_pb2.Empty, timeout=60)


def test_the_workload_starts_with_its_vcpus_and_memory_online(containerd: PrivateContainerd):
    """Create returns once the hot-plugged vCPUs and memory are online (as Kata's does): the first
    instruction of the workload sees them, no waiting (before, `nproc` printed 1 here)."""
    ctd = containerd
    image = ctd.import_busybox()
    result = ctd.ctr("run", "--rm", "--runtime", RUNTIME, "--cpus", "2", "--memory-limit", str(256 * MiB),
                     image, "eager", "sh", "-c", "nproc; grep MemTotal /proc/meminfo", timeout=300)
    out = result.stdout.decode()
    first, second = out.split("\n")[:2]
    assert first.strip() == "3", out  # the default vCPU + the container's 2
    total_kib = int(re.search(r"MemTotal:\s+(\d+)", second).group(1))
    assert total_kib > 512 * 1024 - 160 * 1024 + 200 * 1024, out  # 256 MiB more than the default VM's
    wait_for(lambda: not qemu_pids(ctd), timeout=30, what="QEMU gone")


def test_vm_grows_and_shrinks_with_its_containers(containerd: PrivateContainerd):
    ctd = containerd
    image = ctd.import_busybox()
    pod = ["--annotation", "io.kubernetes.cri.sandbox-id=big"]
    # default VM: 1 vCPU, 512 MiB; max 4 vCPUs
    ctd.ctr("run", "-d", "--runtime", RUNTIME, "--cpus", "2", "--memory-limit", str(256 * MiB), image, "big",
            "sleep", "600")
    try:
        wait_for(lambda: task_status(ctd, "big") == "RUNNING", what="big running")
        wait_for(lambda: nproc(ctd, "big") == 3, timeout=60, what="1 + 2 vCPUs online in the guest")
        base_kib = 512 * 1024
        wait_for(lambda: mem_total_kib(ctd, "big") > base_kib - 160 * 1024 + 200 * 1024, timeout=60,
                 what="256 MiB more guest memory")
        grown = mem_total_kib(ctd, "big")

        # the vCPU threads sit in the sandbox cgroup, constrained to the containers' quota
        (qemu,) = qemu_pids(ctd)
        cgroups = wait_for(lambda: (lambda c: c if c and len(set(c.values())) == 1 else None)(
            vcpu_cgroups(qemu)), timeout=30, what="the vCPU threads in one cgroup")
        sandbox_cgroup = next(iter(cgroups.values()))
        assert sandbox_cgroup.endswith("/kata_big"), cgroups
        assert cpu_quota_us(sandbox_cgroup) == 200_000

        # a second container of the same sandbox grows the VM further (clamped at max_vcpus = 4)...
        ctd.ctr("run", "-d", "--runtime", RUNTIME, "--cpus", "1", "--memory-limit", str(128 * MiB),
                "--annotation", "io.kubernetes.cri.container-type=container", *pod, image, "small",
                "sleep", "600")
        wait_for(lambda: task_status(ctd, "small") == "RUNNING", what="small running")
        assert len(qemu_pids(ctd)) == 1
        wait_for(lambda: nproc(ctd, "big") == 4, timeout=60, what="4 vCPUs with the second container")
        wait_for(lambda: mem_total_kib(ctd, "big") >= grown + 100 * 1024, timeout=60, what="128 MiB more")
        wait_for(lambda: cpu_quota_us(sandbox_cgroup) == 300_000, timeout=30, what="quota 3 CPUs")
        # ...and its exit shrinks the pod again: the host quota always; the vCPUs themselves where QEMU
        # can unplug them (not under single-threaded TCG, the default here: see vmm/config.py)
        ctd.ctr("tasks", "kill", "--signal", "SIGKILL", "small")
        wait_for(lambda: task_status(ctd, "small") == "STOPPED", what="small stopped")
        wait_for(lambda: cpu_quota_us(sandbox_cgroup) == 200_000, timeout=30, what="quota back to 2 CPUs")
        if UNPLUG_WORKS:
            wait_for(lambda: nproc(ctd, "big") == 3, timeout=90, what="back to 3 vCPUs after the exit")
        ctd.ctr("tasks", "delete", "small")
        ctd.ctr("containers", "delete", "small")

        # Task Update (what CRI's UpdateContainerResources sends) resizes a running container
        trio.run(update_task, ctd, "big", "big", {"cpu": {"quota": 100_000, "period": 100_000},
                                                   "memory": {"limit": 384 * MiB}})
        # Update returns once the memory is online: no waiting for it
        assert mem_total_kib(ctd, "big") >= grown + 100 * 1024, "memory grown to the updated 384 MiB limit"
        wait_for(lambda: cpu_quota_us(sandbox_cgroup) == 100_000, timeout=30, what="quota 1 CPU")
        if UNPLUG_WORKS:
            wait_for(lambda: nproc(ctd, "big") == 2, timeout=90, what="2 vCPUs after Update to 1 CPU")
    finally:
        for cid in ("small", "big"):
            ctd.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
        for cid in ("small", "big"):
            wait_for(lambda c=cid: task_status(ctd, c) in ("STOPPED", ""), what=f"{cid} stopped")
            ctd.ctr("tasks", "delete", cid, check=False)
            ctd.ctr("containers", "delete", cid, check=False)
    wait_for(lambda: not qemu_pids(ctd), timeout=30, what="QEMU gone")
    time.sleep(0.5)
