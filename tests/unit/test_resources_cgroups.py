"""Host cgroups (shim/resources/cgroups.py): the plan as tables, the applier against real cgroups when the
host lets us create them (root, writable cgroupfs), with a real thread of a sleeping subprocess."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from shim.resources.cgroups import (
    CgroupManager,
    CgroupPlan,
    CgroupVersion,
    CpuLimits,
    cgroup_path_from_oci,
    detect_version,
    plan_cgroups,
    sandbox_cpu_limits,
    threads_of,
)
from shim.resources.sizing import ContainerResources

V1, V2 = CgroupVersion.V1, CgroupVersion.V2

# ------------------------------------------------------------------------------------------ planning


@pytest.mark.parametrize(
    ("oci", "path"),
    [
        ("/kubepods/burstable/pod1/abc", "/kubepods/burstable/pod1/abc"),
        ("kubepods//pod1/./abc/", "/kubepods/pod1/abc"),
        (
            "kubepods-burstable-pod1.slice:cri-containerd:abc",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope",
        ),
        ("system.slice:docker:abc", "/system.slice/docker-abc.scope"),
        (":cri:abc", "/cri-abc.scope"),
        ("-.slice::abc", "/abc"),
    ],
)
def test_cgroup_path_from_oci(oci: str, path: str) -> None:
    assert cgroup_path_from_oci(oci) == path


@pytest.mark.parametrize("oci", ["", "  ", "/", "/a/../b", "a--b.slice:x:y", "nope:x:y", "a/b.slice:x:y"])
def test_cgroup_path_from_oci_rejects(oci: str) -> None:
    with pytest.raises(ValueError):
        cgroup_path_from_oci(oci)


POD = "/kubepods/burstable/pod1"


@pytest.mark.parametrize(
    ("version", "only", "plan"),
    [
        (V1, True, CgroupPlan(V1, f"{POD}/kata_sb", f"{POD}/kata_sb", None, (), (f"{POD}/kata_sb",))),
        (V2, True, CgroupPlan(V2, f"{POD}/kata_sb", f"{POD}/kata_sb", None, (), (f"{POD}/kata_sb",))),
        # v1 split: Kata's layout, the shim and QEMU in an unconstrained cgroup outside the pod
        (
            V1,
            False,
            CgroupPlan(
                V1,
                "/kata_overhead/sb",
                f"{POD}/kata_sb",
                "/kata_overhead/sb",
                (),
                (f"{POD}/kata_sb", "/kata_overhead/sb"),
            ),
        ),
        # v2 split: threads cannot leave their threaded subtree, so both halves are threaded children
        (
            V2,
            False,
            CgroupPlan(
                V2,
                f"{POD}/kata_sb",
                f"{POD}/kata_sb/vcpus",
                f"{POD}/kata_sb/overhead",
                (f"{POD}/kata_sb/vcpus", f"{POD}/kata_sb/overhead"),
                (f"{POD}/kata_sb", f"{POD}/kata_sb/vcpus", f"{POD}/kata_sb/overhead"),
            ),
        ),
    ],
)
def test_plan(version: CgroupVersion, only: bool, plan: CgroupPlan) -> None:
    got = plan_cgroups(f"{POD}/sb", "sb", version=version, sandbox_cgroup_only=only)
    assert got == plan
    assert got.split is (not only)


def test_plan_rejects_a_bad_sandbox_id() -> None:
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="sandbox id"):
            plan_cgroups(f"{POD}/sb", bad, version=V1, sandbox_cgroup_only=False)


def c(quota: int | None, period: int | None = 100_000, cpus: str = "") -> ContainerResources:
    return ContainerResources(cpu_quota=quota, cpu_period=period, cpuset_cpus=cpus)


@pytest.mark.parametrize(
    ("containers", "limits"),
    [
        ([], CpuLimits(None, 100_000, "")),
        ([(c(50_000), True), (c(50_000), True)], CpuLimits(100_000, 100_000, "")),
        # different periods: milli-CPUs summed (the seed's sum-of-quotas over the max period gave 60_000)
        ([(c(50_000), True), (c(10_000, 20_000), True)], CpuLimits(100_000, 100_000, "")),
        # stopped containers don't count
        ([(c(50_000), True), (c(400_000), False), (c(None), False)], CpuLimits(50_000, 100_000, "")),
        # any running unlimited container makes the sandbox unlimited (kubelet's pod rule)
        ([(c(50_000), True), (c(None), True)], CpuLimits(None, 100_000, "")),
        ([(c(50_000), True), (c(-1), True)], CpuLimits(None, 100_000, "")),
        # never below the kernel's 1 ms minimum
        ([(c(1_000, 1_000_000), True)], CpuLimits(1_000, 100_000, "")),
        # cpusets: union, or none if any running container is unpinned
        (
            [(c(50_000, cpus="0-1"), True), (c(50_000, cpus="1,3"), True)],
            CpuLimits(100_000, 100_000, "0-1,3"),
        ),
        ([(c(50_000, cpus="0-1"), True), (c(50_000), True)], CpuLimits(100_000, 100_000, "")),
        ([(c(50_000, cpus="0-1"), True), (c(50_000, cpus="5"), False)], CpuLimits(50_000, 100_000, "0-1")),
    ],
)
def test_sandbox_cpu_limits(containers: list[tuple[ContainerResources, bool]], limits: CpuLimits) -> None:
    assert sandbox_cpu_limits(containers) == limits


def test_cpu_max_line() -> None:
    assert CpuLimits(None).cpu_max == "max 100000"
    assert CpuLimits(150_000, 100_000).cpu_max == "150000 100000"


def test_detect_version(tmp_path: os.PathLike[str]) -> None:
    assert detect_version(str(tmp_path)) is V1
    open(os.path.join(tmp_path, "cgroup.controllers"), "w").close()
    assert detect_version(str(tmp_path)) is V2


# ------------------------------------------------------------------------------------------ applier

SLEEPER = """
import threading, time
t = threading.Thread(target=lambda: (print(threading.get_native_id(), flush=True), time.sleep(120)), daemon=True)
t.start()
time.sleep(120)
"""


@pytest.fixture
def sleeper() -> Iterator[tuple[int, int]]:
    """A subprocess sleeping in two threads: (pid, tid of the second thread, our "vCPU")."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tid = int(proc.stdout.readline())
        yield proc.pid, tid
    finally:
        proc.kill()
        proc.wait()


def cgroup_of(tid: int, hierarchy: str) -> str:
    """The cgroup of thread `tid` in a hierarchy ("" for v2, else a v1 controller name)."""
    with open(f"/proc/{tid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy in controllers.split(","):
                return path
    raise AssertionError(f"no {hierarchy!r} line for {tid}")


def writable_mount(version: CgroupVersion) -> str:
    """A cgroup mount of `version` we may create cgroups in, or skip the test saying why."""
    if version is V2:
        candidates = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        ok = [m for m in candidates if os.path.exists(f"{m}/cgroup.controllers")]
        probe_dirs = ok[:1]
    else:
        ok = ["/sys/fs/cgroup"] if detect_version() is V1 and os.path.isdir("/sys/fs/cgroup/cpu") else []
        probe_dirs = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuset"] if ok else []
    if not ok:
        pytest.skip(f"no cgroup {version.name} hierarchy mounted on this host")
    for directory in probe_dirs:
        probe = os.path.join(directory, f"kata-py-probe-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as exc:
            pytest.skip(
                f"cannot create cgroups under {directory}: {exc.strerror} (needs root and a writable cgroupfs)"
            )
    return ok[0]


@contextlib.contextmanager
def pod_cgroup(version: CgroupVersion, mount: str) -> Iterator[str]:
    """A throwaway "pod" cgroup standing in for kubelet's, removed afterwards whatever happens."""
    pod = f"/kata-py-test-{uuid.uuid4().hex[:8]}"
    roots = [mount] if version is V2 else [f"{mount}/cpu", f"{mount}/cpuset"]
    try:
        yield pod
    finally:
        for root in roots:
            for dirpath, _, _ in sorted(os.walk(root + pod), key=lambda w: -len(w[0])):
                rescue_tasks(root, dirpath, "cgroup.threads" if version is V2 else "tasks")
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            assert not os.path.exists(root + pod), f"test cgroup {root + pod} left behind"


def rescue_tasks(root: str, directory: str, member_file: str) -> None:
    """After a failed test: move whatever is left in `directory` back to the root cgroup, whole processes."""
    with contextlib.suppress(OSError):
        with open(os.path.join(directory, member_file)) as f:
            tids = [int(t) for t in f.read().split()]
        for tid in tids:
            with open(f"/proc/{tid}/status") as f:
                tgid = next(line.split()[1] for line in f if line.startswith("Tgid:"))
            with open(os.path.join(root, "cgroup.procs"), "w") as f:
                f.write(tgid)


def test_v2_split_layout_moves_vcpu_threads_and_cleans_up(sleeper: tuple[int, int]) -> None:
    mount = writable_mount(V2)
    pid, vcpu = sleeper
    with pod_cgroup(V2, mount) as pod:
        os.mkdir(mount + pod)
        plan = plan_cgroups(f"{pod}/sb", "sb", version=V2, sandbox_cgroup_only=False)
        mgr = CgroupManager(plan, mount)
        notes = mgr.create()
        assert mgr.create() == notes  # idempotent
        with open(f"{mount}{pod}/kata_sb/vcpus/cgroup.type") as f:
            assert f.read().strip() == "threaded"
        limit_notes = mgr.set_limits(CpuLimits(50_000, 100_000, ""))
        has_cpu = os.path.exists(f"{mount}{pod}/kata_sb/vcpus/cpu.max")
        if has_cpu:
            with open(f"{mount}{pod}/kata_sb/vcpus/cpu.max") as f:
                assert f.read().split() == ["50000", "100000"]
        else:
            assert any("cpu.max" in n for n in limit_notes)

        mgr.add_process(pid)
        assert {cgroup_of(t, "") for t in threads_of(pid)} == {f"{pod}/kata_sb"}
        mgr.constrain_vcpus(pid, [vcpu])
        assert cgroup_of(vcpu, "") == f"{pod}/kata_sb/vcpus"
        others = set(threads_of(pid)) - {vcpu}
        assert others and {cgroup_of(t, "") for t in others} == {f"{pod}/kata_sb/overhead"}

        mgr.delete()
        assert not os.path.exists(f"{mount}{pod}/kata_sb")
        # the still-running process was handed to the pod cgroup, all threads together
        assert {cgroup_of(t, "") for t in threads_of(pid)} == {pod}
        mgr.delete()  # idempotent
        with open(f"{mount}/cgroup.procs", "w") as f:
            f.write(str(pid))


def test_v2_sandbox_only_layout(sleeper: tuple[int, int]) -> None:
    mount = writable_mount(V2)
    pid, vcpu = sleeper
    with pod_cgroup(V2, mount) as pod:
        os.mkdir(mount + pod)
        mgr = CgroupManager(plan_cgroups(f"{pod}/sb", "sb", version=V2, sandbox_cgroup_only=True), mount)
        mgr.create()
        mgr.add_process(pid)
        mgr.constrain_vcpus(pid, [vcpu])  # nothing to split
        assert {cgroup_of(t, "") for t in threads_of(pid)} == {f"{pod}/kata_sb"}
        mgr.delete()
        assert not os.path.exists(f"{mount}{pod}/kata_sb")
        with open(f"{mount}/cgroup.procs", "w") as f:
            f.write(str(pid))


def test_v1_split_layout_sets_limits_moves_vcpu_threads_and_cleans_up(sleeper: tuple[int, int]) -> None:
    mount = writable_mount(V1)
    pid, vcpu = sleeper
    sandbox_id = f"kata-py-test-{uuid.uuid4().hex[:8]}"
    with pod_cgroup(V1, mount) as pod:
        plan = plan_cgroups(f"{pod}/sb", sandbox_id, version=V1, sandbox_cgroup_only=False)
        mgr = CgroupManager(plan, mount)
        try:
            mgr.create()
            assert mgr.set_limits(CpuLimits(50_000, 100_000, "0")) == []
            with open(f"{mount}/cpu{pod}/kata_sb/cpu.cfs_quota_us") as f:
                assert f.read().strip() == "50000"
            with open(f"{mount}/cpuset{pod}/kata_sb/cpuset.cpus") as f:
                assert f.read().strip() == "0"
            # "no cpuset" on v1 is the parent's set, since v1 refuses an empty one
            mgr.set_limits(CpuLimits(None))
            with open(f"{mount}/cpu{pod}/kata_sb/cpu.cfs_quota_us") as f:
                assert f.read().strip() == "-1"
            with (
                open(f"{mount}/cpuset{pod}/kata_sb/cpuset.cpus") as f,
                open(f"{mount}/cpuset{pod}/cpuset.cpus") as g,
            ):
                assert f.read() == g.read()

            mgr.add_process(pid)
            mgr.constrain_vcpus(pid, [vcpu])
            for hierarchy in ("cpu", "cpuset"):
                assert cgroup_of(vcpu, hierarchy) == f"{pod}/kata_sb"
                assert cgroup_of(pid, hierarchy) == f"/kata_overhead/{sandbox_id}"

            mgr.delete()
            mgr.delete()  # idempotent
            for hierarchy in ("cpu", "cpuset"):
                assert not os.path.exists(f"{mount}/{hierarchy}{pod}/kata_sb")
                assert not os.path.exists(f"{mount}/{hierarchy}/kata_overhead/{sandbox_id}")
                assert cgroup_of(vcpu, hierarchy) == pod
                assert cgroup_of(pid, hierarchy) == "/kata_overhead"
                with open(f"{mount}/{hierarchy}/cgroup.procs", "w") as f:
                    f.write(str(pid))
        finally:
            mgr.delete()
            for hierarchy in ("cpu", "cpuset"):
                with contextlib.suppress(OSError):
                    os.rmdir(f"{mount}/{hierarchy}/kata_overhead")
