"""The few trio helpers every package here shares (ttrpc, vmm, agent_client, shim); imports only trio.

- `unwrap_single()`: since trio 0.25 every nursery raises an ExceptionGroup, even around a single
  error (strict_exception_groups). A function or context manager whose contract names a bare
  exception (VmStartError, QmpDisconnected, a ttrpc error out of a client's `async with` body) wraps
  its own nursery in it, so callers keep catching what the docstring says. Only groups of exactly one
  exception (nested or not) are opened; anything with two or more stays a group: nothing is dropped.
  Older trio (non-strict nurseries) raises the bare exception already, which passes through as is.
  `open_nursery_unwrapped()` is a nursery inside it.
- `run_sync_abandoning()`: `trio.to_thread.run_sync` whose cancelled caller returns at once while the
  thread runs on (trio 0.23 renamed `cancellable=` to `abandon_on_cancel=` and later removed the old
  name; trio 0.22.2 is still the declared floor, so the keyword is chosen once, here).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import trio

__all__ = ["open_nursery_unwrapped", "run_sync_abandoning", "single_exception", "unwrap_single"]

T = TypeVar("T")


def single_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The one leaf exception of `group` if it holds exactly one (through nested groups), else None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise the only exception of an ExceptionGroup raised inside, keeping its own context."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc = single_exception(group)
        if exc is None:
            raise
        context = exc.__context__  # raising it here would chain the group as its context
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc, context, group  # no reference cycle through this frame


@asynccontextmanager
async def open_nursery_unwrapped() -> AsyncIterator[trio.Nursery]:
    """`trio.open_nursery()` whose single error (a child's or the body's) comes out bare."""
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            yield nursery


_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else "cancellable")


async def run_sync_abandoning(fn: Callable[[], T], *, limiter: Any = None, thread_name: str | None = None) -> T:
    """Run `fn` in a worker thread; if we are cancelled, return (raise Cancelled) without waiting for it.

    `limiter`: a trio.CapacityLimiter or anything with its acquire/release_on_behalf_of (None: trio's
    default). The thread keeps its token until it really ends, so the caller must make it end soon
    (e.g. cancel the call it blocks on)."""
    kwargs = {_ABANDON: True}
    return await trio.to_thread.run_sync(fn, limiter=limiter, thread_name=thread_name, **kwargs)
