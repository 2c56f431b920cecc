"""The task that converges the VM's size toward the newest `Target`.

The sandbox owns one `Reconciler` and starts it with ``await nursery.start(reconciler.run)``. After any
change (container created, started, stopped, updated, deleted) it calls ``reconciler.request(target)``,
or ``reconciler.request()`` to have the reconciler read its provider callback at pass time. Requests
never block and never fail: the caller has already answered containerd by the time the VM follows.

Policy:

* Only the newest target matters. Requests are coalesced: a burst while the task is idle gives one
  pass; any number of requests while a pass runs gives exactly one more pass, for the newest target.
* A pass calls ``vm.resize_vcpus`` then ``vm.resize_memory`` (each only when the recorded size differs
  from the target), then, if anything was added, ``guest.online_cpu_mem(nb_cpus=<vCPUs now>, wait=True)``
  so the guest kernel brings the new vCPUs and memory blocks online. Shrinking needs no onlining: QEMU
  unplugs vCPUs through ACPI and the guest offlines them.
* Recorded state is always the truth as last reported: the sizes the VMM *returned* (it may give less
  than asked, e.g. memory it cannot unplug), and whether an online is still owed. A step that raises
  leaves earlier steps recorded, so the retry only redoes what is missing.
* A failed pass is retried with exponential back-off (`Backoff`), bounded in delay and in attempts.
  Requests arriving during a back-off fold into the retry instead of cutting the delay short: the VMM
  or agent is failing and hammering it won't help. After `max_attempts` consecutive failures the
  reconciler gives up on that target, emits a warning, and waits for the next request.
* Warnings (clamped targets, giving up, a VMM that gave a different size than asked) go to the
  `on_warning` hook, which the sandbox turns into events; they are never raised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from shim.errors import DeadlineExceeded, Unavailable
from shim.resources.sizing import Target

log = logging.getLogger(__name__)


class VmResizer(Protocol):
    """The two Hypervisor methods the reconciler needs; each returns the size actually reached.

    Positional-only so that `vmm.hypervisor.Hypervisor` (``target``, ``target_mib``) matches structurally.
    """

    async def resize_vcpus(self, n: int, /) -> int: ...

    async def resize_memory(self, mib: int, /) -> int: ...


class GuestOnliner(Protocol):
    """The Agent method that onlines hot-added vCPUs and memory in the guest."""

    async def online_cpu_mem(self, nb_cpus: int, wait: bool) -> object: ...


@dataclass(frozen=True)
class Backoff:
    """Retry delays: first, first*factor, ... capped at `max_delay`; give up after `max_attempts`."""

    first: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    max_attempts: int = 6

    def delay(self, failures: int) -> float:
        """Delay before the retry that follows the `failures`-th consecutive failure (1-based)."""
        # the exponent is capped so a huge failure count cannot overflow the float
        return min(self.first * self.factor ** min(failures - 1, 64), self.max_delay)


@dataclass(frozen=True)
class ReconcilerState:
    """A snapshot for callers and tests."""

    vcpus: int
    memory_mib: int
    target: Target | None  # the target of the newest pass (None before the first pass)
    online_pending: bool  # hot-added resources the guest has not yet confirmed online
    converged: bool  # every request so far was applied by a pass that completed
    failures: int  # consecutive failed passes
    gave_up: bool  # the newest request hit max_attempts; waits for the next request
    last_error: str | None
    passes: int  # passes started, successful or not


class Reconciler:
    """Converges a VM toward the newest requested `Target`; see the module docstring for the policy."""

    def __init__(
        self,
        vm: VmResizer,
        guest: GuestOnliner,
        *,
        vcpus: int,
        memory_mib: int,
        provider: Callable[[], Target] | None = None,
        on_warning: Callable[[str], None] | None = None,
        backoff: Backoff = Backoff(),
    ) -> None:
        """`vcpus` and `memory_mib` are the VM's size at boot (what the VMM reports before any resize)."""
        self._vm = vm
        self._guest = guest
        self._provider = provider
        self._on_warning = on_warning or (lambda msg: log.warning("%s", msg))
        self._backoff = backoff
        # All fields below are touched only from trio tasks of one thread: no lock needed.
        self._vcpus = vcpus
        self._memory_mib = memory_mib
        self._online_pending = False
        self._requested_target: Target | None = None  # None: ask the provider at pass time
        self._target: Target | None = None  # what the newest pass aimed at
        self._requested = 0  # generation of the newest request
        self._applied = 0  # generation of the newest request a completed pass applied
        self._failures = 0
        self._gave_up = False
        self._last_error: str | None = None
        self._passes = 0
        self._running = False
        self._last_clamped: tuple[str, ...] = ()
        self._wakeup = trio.Event()  # set when there is work (a request or a retry)
        self._changed = trio.Event()  # pulsed after every pass, for wait_converged

    # ------------------------------------------------------------------------------------ requests

    def request(self, target: Target | None = None) -> None:
        """Ask for `target`, or, when None, for whatever the provider returns when the pass starts.

        Never blocks. Raises ValueError when called without a target and without a provider.
        """
        if target is None and self._provider is None:
            raise ValueError("request() without a target needs a provider")
        self._requested_target = target
        self._requested += 1
        if self._gave_up:
            # a new request is a new chance: start counting failures afresh
            self._gave_up = False
            self._failures = 0
        self._wakeup.set()

    @property
    def state(self) -> ReconcilerState:
        return ReconcilerState(
            vcpus=self._vcpus,
            memory_mib=self._memory_mib,
            target=self._target,
            online_pending=self._online_pending,
            converged=self._converged(),
            failures=self._failures,
            gave_up=self._gave_up,
            last_error=self._last_error,
            passes=self._passes,
        )

    def _converged(self) -> bool:
        return self._applied == self._requested

    async def wait_converged(self, timeout: float = math.inf) -> ReconcilerState:
        """Wait until every request so far has been applied; return the state then.

        Raises DeadlineExceeded after `timeout` seconds, and Unavailable when the reconciler gave up on
        the newest request (the message carries the last error).
        """
        with trio.move_on_after(timeout):
            while not self._converged():
                if self._gave_up:
                    raise Unavailable(
                        f"VM resize gave up after {self._failures} attempts: {self._last_error}"
                    )
                await self._changed.wait()
            return self.state
        raise DeadlineExceeded(f"VM resize did not converge within {timeout}s (state {self.state})")

    # ------------------------------------------------------------------------------------ the task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reconciler loop. Runs until cancelled; one instance at a time."""
        if self._running:
            raise RuntimeError("Reconciler.run is already running")
        self._running = True
        try:
            task_status.started()
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                generation = self._requested
                try:
                    await self._pass()
                except Exception as exc:  # any VMM/agent/provider failure is retried, never raised
                    await self._failed(exc)
                else:
                    self._failures = 0
                    self._last_error = None
                    self._applied = max(self._applied, generation)
                self._pulse()
        finally:
            self._running = False

    async def _pass(self) -> None:
        self._passes += 1
        target = self._requested_target
        if target is None:
            assert self._provider is not None  # request() checked
            target = self._provider()
        self._target = target
        if target.clamped and target.clamped != self._last_clamped:
            for line in target.clamped:
                self._on_warning(line)
        self._last_clamped = target.clamped

        if target.vcpus != self._vcpus:
            got = await self._vm.resize_vcpus(target.vcpus)
            self._online_pending |= got > self._vcpus
            self._note_shortfall("vCPUs", target.vcpus, got)
            self._vcpus = got
        if target.memory_mib != self._memory_mib:
            got = await self._vm.resize_memory(target.memory_mib)
            self._online_pending |= got > self._memory_mib
            self._note_shortfall("memory MiB", target.memory_mib, got)
            self._memory_mib = got
        if self._online_pending:
            await self._guest.online_cpu_mem(nb_cpus=self._vcpus, wait=True)
            self._online_pending = False

    def _note_shortfall(self, what: str, asked: int, got: int) -> None:
        if got != asked:
            self._on_warning(f"VM resize: asked for {asked} {what}, the VMM gave {got}")

    async def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.warning("VM resize pass %d failed (%s)", self._failures, self._last_error)
        if self._failures >= self._backoff.max_attempts:
            self._gave_up = True
            self._on_warning(
                f"VM resize failed {self._failures} times, giving up until the next change: {exc}"
            )
            return
        self._pulse()  # let waiters see the failure count
        await trio.sleep(self._backoff.delay(self._failures))
        self._wakeup.set()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
