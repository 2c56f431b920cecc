"""Rules of the VM-size reconciler (shim/resources/reconciler.py), driven by small fakes."""

from __future__ import annotations

import pytest
import trio

from shim.errors import DeadlineExceeded, Unavailable
from shim.resources.reconciler import Backoff, Reconciler
from shim.resources.sizing import Target


class FakeVm:
    """A VMM that records calls, can be held mid-call by `gate`, fail on demand, and refuse to unplug."""

    def __init__(self, vcpus: int = 1, memory_mib: int = 2048, *, min_memory_mib: int = 0) -> None:
        self.vcpus = vcpus
        self.memory_mib = memory_mib
        self.min_memory_mib = min_memory_mib  # memory it cannot unplug
        self.calls: list[tuple[str, int]] = []
        self.gate: trio.Event | None = None
        self.entered = trio.Event()
        self.fail_vcpus = 0
        self.fail_memory = 0

    async def resize_vcpus(self, n: int) -> int:
        self.calls.append(("vcpus", n))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.fail_vcpus:
            self.fail_vcpus -= 1
            raise RuntimeError("QMP: device_add failed")
        self.vcpus = n
        return n

    async def resize_memory(self, mib: int) -> int:
        self.calls.append(("memory", mib))
        await trio.lowlevel.checkpoint()
        if self.fail_memory:
            self.fail_memory -= 1
            raise RuntimeError("QMP: object-add failed")
        self.memory_mib = max(mib, self.min_memory_mib)
        return self.memory_mib


class FakeGuest:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.fail = 0

    async def online_cpu_mem(self, nb_cpus: int, wait: bool) -> object:
        self.calls.append((nb_cpus, wait))
        await trio.lowlevel.checkpoint()
        if self.fail:
            self.fail -= 1
            raise RuntimeError("agent: timed out onlining CPUs")
        return (nb_cpus, 0)


def make(vm: FakeVm | None = None, **kwargs: object) -> tuple[Reconciler, FakeVm, FakeGuest, list[str]]:
    vm = vm or FakeVm()
    guest = FakeGuest()
    warnings: list[str] = []
    rec = Reconciler(
        vm, guest, vcpus=vm.vcpus, memory_mib=vm.memory_mib, on_warning=warnings.append, **kwargs
    )  # type: ignore[arg-type]
    return rec, vm, guest, warnings


async def test_grow_resizes_then_onlines_the_new_total() -> None:
    rec, vm, guest, warnings = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        rec.request(Target(vcpus=3, memory_mib=2304))
        state = await rec.wait_converged(5)
        nursery.cancel_scope.cancel()
    assert vm.calls == [("vcpus", 3), ("memory", 2304)]
    assert guest.calls == [(3, True)]
    assert (state.vcpus, state.memory_mib, state.online_pending, state.passes) == (3, 2304, False, 1)
    assert state.converged and warnings == []


async def test_a_burst_while_idle_is_one_pass() -> None:
    rec, vm, guest, _ = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        for n in range(2, 12):
            rec.request(Target(vcpus=n, memory_mib=2048))
        state = await rec.wait_converged(5)
        nursery.cancel_scope.cancel()
    assert state.passes == 1
    assert vm.calls == [("vcpus", 11)]


async def test_requests_during_a_pass_give_exactly_one_more_pass_for_the_newest() -> None:
    rec, vm, guest, _ = make()
    vm.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        rec.request(Target(vcpus=2, memory_mib=2048))
        await vm.entered.wait()  # the first pass is now inside resize_vcpus
        for n in range(3, 10):
            rec.request(Target(vcpus=n, memory_mib=2048 + 128 * n))
        assert not rec.state.converged
        vm.gate.set()
        state = await rec.wait_converged(5)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert state.passes == rec.state.passes == 2
    assert vm.calls == [("vcpus", 2), ("vcpus", 9), ("memory", 2048 + 128 * 9)]
    assert (state.vcpus, state.memory_mib) == (9, 2048 + 128 * 9)
    assert guest.calls == [(2, True), (9, True)]


async def test_a_failed_step_keeps_what_succeeded_and_retries_with_backoff(autojump_clock: object) -> None:
    rec, vm, guest, warnings = make(backoff=Backoff(first=0.5, factor=2, max_delay=30, max_attempts=5))
    vm.fail_memory = 2
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        start = trio.current_time()
        rec.request(Target(vcpus=3, memory_mib=2560))
        await trio.sleep(0.1)
        # pass 1: vCPUs done and recorded, memory failed, the online is still owed
        state = rec.state
        assert (state.vcpus, state.memory_mib, state.failures, state.online_pending) == (3, 2048, 1, True)
        assert "object-add failed" in (state.last_error or "")
        assert not state.converged
        state = await rec.wait_converged(60)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    # retries after 0.5 s then 1 s more; the vCPU step is not redone
    assert elapsed == pytest.approx(1.5)
    assert vm.calls == [("vcpus", 3), ("memory", 2560), ("memory", 2560), ("memory", 2560)]
    assert guest.calls == [(3, True)]
    assert (state.vcpus, state.memory_mib, state.failures, state.last_error, state.passes) == (
        3,
        2560,
        0,
        None,
        3,
    )
    assert warnings == []


async def test_a_failed_online_is_retried_even_though_the_sizes_match(autojump_clock: object) -> None:
    rec, vm, guest, _ = make()
    guest.fail = 1
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        rec.request(Target(vcpus=2, memory_mib=2048))
        state = await rec.wait_converged(60)
        nursery.cancel_scope.cancel()
    assert vm.calls == [("vcpus", 2)]
    assert guest.calls == [(2, True), (2, True)]
    assert not state.online_pending


async def test_backoff_is_bounded_then_gives_up_until_the_next_request(autojump_clock: object) -> None:
    rec, vm, guest, warnings = make(backoff=Backoff(first=1, factor=10, max_delay=5, max_attempts=4))
    vm.fail_vcpus = 100
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        start = trio.current_time()
        rec.request(Target(vcpus=2, memory_mib=2048))
        with pytest.raises(Unavailable, match="device_add failed"):
            await rec.wait_converged(600)
        # delays 1, then 10 capped to 5, then 5: four attempts in 11 s
        assert trio.current_time() - start == pytest.approx(11)
        assert [c for c in vm.calls if c[0] == "vcpus"] == [("vcpus", 2)] * 4
        assert rec.state.gave_up and rec.state.failures == 4
        assert len(warnings) == 1 and "giving up" in warnings[0]
        # no more attempts on its own
        await trio.sleep(1000)
        assert len(vm.calls) == 4
        # a new request is a new chance
        vm.fail_vcpus = 0
        rec.request(Target(vcpus=2, memory_mib=2048))
        state = await rec.wait_converged(60)
        nursery.cancel_scope.cancel()
    assert state.vcpus == 2 and not state.gave_up and state.failures == 0


async def test_shrink_needs_no_online_and_records_what_the_vmm_could_do() -> None:
    vm = FakeVm(vcpus=4, memory_mib=4096, min_memory_mib=3072)
    rec, vm, guest, warnings = make(vm)
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        rec.request(Target(vcpus=1, memory_mib=2048))
        state = await rec.wait_converged(5)
        nursery.cancel_scope.cancel()
    assert vm.calls == [("vcpus", 1), ("memory", 2048)]
    assert guest.calls == []
    # the VMM could not unplug everything: recorded as is, reported, and not retried forever
    assert (state.vcpus, state.memory_mib, state.converged, state.passes) == (1, 3072, True, 1)
    assert warnings == ["VM resize: asked for 2048 memory MiB, the VMM gave 3072"]


async def test_request_without_target_reads_the_provider_at_pass_time() -> None:
    size = {"vcpus": 1}
    vm = FakeVm()
    guest = FakeGuest()
    rec = Reconciler(vm, guest, vcpus=1, memory_mib=2048, provider=lambda: Target(size["vcpus"], 2048))
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        size["vcpus"] = 2
        rec.request()
        size["vcpus"] = 4  # changed before the pass started: the pass sees 4
        await rec.wait_converged(5)
        nursery.cancel_scope.cancel()
    assert vm.calls == [("vcpus", 4)]
    assert rec.state.target == Target(4, 2048)


def test_request_without_target_or_provider_is_an_error() -> None:
    rec, *_ = make()
    with pytest.raises(ValueError, match="provider"):
        rec.request()


async def test_clamped_targets_warn_once_per_distinct_clamp() -> None:
    rec, vm, guest, warnings = make()
    clamped = Target(8, 2048, clamped=("vCPUs: containers need 12, clamped to max_vcpus 8",))
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        for _ in range(3):
            rec.request(clamped)
            await rec.wait_converged(5)
        rec.request(Target(2, 2048))
        await rec.wait_converged(5)
        rec.request(clamped)
        await rec.wait_converged(5)
        nursery.cancel_scope.cancel()
    assert warnings == list(clamped.clamped) * 2


async def test_cancelling_the_nursery_stops_the_task_mid_pass() -> None:
    rec, vm, guest, _ = make()
    vm.gate = trio.Event()  # never set: the pass hangs in the VMM
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(rec.run)
            rec.request(Target(vcpus=2, memory_mib=2048))
            await vm.entered.wait()
            nursery.cancel_scope.cancel()
    state = rec.state
    assert (state.vcpus, state.converged, state.failures) == (1, False, 0)
    # the task can be started again (e.g. after restore) and picks the request up
    vm.gate = None
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        rec.request(Target(vcpus=2, memory_mib=2048))
        await rec.wait_converged(5)
        nursery.cancel_scope.cancel()
    assert rec.state.vcpus == 2


async def test_only_one_run_at_a_time() -> None:
    rec, *_ = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        with pytest.raises(RuntimeError, match="already running"):
            await rec.run()
        nursery.cancel_scope.cancel()


async def test_wait_converged_times_out(autojump_clock: object) -> None:
    rec, vm, _, _ = make()
    vm.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        rec.request(Target(vcpus=2, memory_mib=2048))
        with pytest.raises(DeadlineExceeded):
            await rec.wait_converged(3)
        nursery.cancel_scope.cancel()


async def test_wait_converged_returns_at_once_when_nothing_was_asked() -> None:
    rec, *_ = make()
    state = await rec.wait_converged(0)
    assert state.converged and state.passes == 0


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (60, 30.0), (5000, 30.0)]
)
def test_backoff_delays(failures: int, delay: float) -> None:
    assert Backoff().delay(failures) == delay
