"""kata_trio: a nursery's single error comes out bare (whatever trio's strictness), nothing else is
opened up or lost; run_sync_abandoning returns at once when cancelled."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.lowlevel
import trio.testing

from kata_trio import open_nursery_unwrapped, run_sync_abandoning, single_exception, unwrap_single


class Boom(Exception):
    pass


async def fail(exc: BaseException, go: trio.Event | None = None) -> None:
    if go is None:
        await trio.lowlevel.checkpoint()
    else:
        await go.wait()
    raise exc


def test_single_exception_sees_through_nesting_only_with_one_leaf() -> None:
    a, b = Boom("a"), Boom("b")
    assert single_exception(ExceptionGroup("", [a])) is a
    assert single_exception(ExceptionGroup("", [ExceptionGroup("", [a])])) is a
    assert single_exception(ExceptionGroup("", [a, b])) is None
    assert single_exception(ExceptionGroup("", [ExceptionGroup("", [a, b])])) is None


def test_unwrap_single_keeps_cause_and_context() -> None:
    cause, context = OSError("cause"), KeyError("context")
    exc = Boom("x")
    exc.__cause__, exc.__context__ = cause, context
    with pytest.raises(Boom) as info, unwrap_single():
        raise ExceptionGroup("wrapped", [exc])
    assert info.value is exc
    assert (info.value.__cause__, info.value.__context__) == (cause, context)


def test_unwrap_single_leaves_a_group_of_two_and_bare_errors_alone() -> None:
    group = ExceptionGroup("two", [Boom("a"), Boom("b")])
    with pytest.raises(ExceptionGroup) as info, unwrap_single():
        raise group
    assert info.value is group
    with pytest.raises(Boom, match="bare"), unwrap_single():
        raise Boom("bare")


async def test_a_childs_error_and_the_bodys_come_out_bare() -> None:
    with pytest.raises(Boom, match="child"):
        async with open_nursery_unwrapped() as nursery:
            nursery.start_soon(fail, Boom("child"))
            await trio.sleep_forever()
    with pytest.raises(Boom, match="body"):
        async with open_nursery_unwrapped() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise Boom("body")


async def test_two_errors_stay_a_group() -> None:
    go = trio.Event()
    with pytest.raises(ExceptionGroup) as info:
        async with open_nursery_unwrapped() as nursery:
            nursery.start_soon(fail, Boom("one"), go)
            nursery.start_soon(fail, Boom("two"), go)
            await trio.testing.wait_all_tasks_blocked()
            go.set()  # both wake before either is cancelled
    assert sorted(str(e) for e in info.value.exceptions) == ["one", "two"]


async def test_cancellation_passes_through() -> None:
    with trio.move_on_after(0.01) as scope:
        async with open_nursery_unwrapped() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_run_sync_abandoning_returns_at_once_when_cancelled() -> None:
    release = threading.Event()
    limiter = trio.CapacityLimiter(1)
    with trio.move_on_after(0.05) as scope:
        await run_sync_abandoning(lambda: release.wait(10), limiter=limiter, thread_name="test abandon")
    assert scope.cancelled_caught
    assert limiter.borrowed_tokens == 1  # the thread still runs, holding its token
    release.set()
    with trio.fail_after(5):
        async with limiter:  # the thread's token comes back once it has really ended
            pass
    assert await run_sync_abandoning(lambda: 7) == 7
