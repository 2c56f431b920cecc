"""Shared fixtures: leak checking for tests that start real processes, and a private containerd."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support import leaks, owned
from tests.support.containerd import PrivateContainerd
from tests.support.containerd_releases import HOST, Release

REAL_PROCESS_MARKERS = ("vm", "containerd")
owned.mark_this_run()  # before any test starts a process: every child inherits the run's mark


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked vm/containerd must leave no process, socket, mount, netns, tap or cgroup behind;
    only what this run started or made is watched, and only its processes are killed."""
    if not any(request.node.get_closest_marker(m) for m in REAL_PROCESS_MARKERS):
        yield
        return
    before = leaks.snapshot()
    yield
    left: list[str] = []
    for _ in range(50):  # processes may still be exiting
        left = leaks.leaked(before, leaks.snapshot())
        if not left:
            return
        time.sleep(0.1)
    for item in left:  # don't let one test's leak poison the next
        if item.startswith("processes: "):
            pid = int(item.split()[1].rstrip(":"))
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    pytest.fail("test leaked:\n" + "\n".join(left))


@pytest.fixture
def containerd_release(request: pytest.FixtureRequest) -> Release:
    """The containerd release a test runs against: the host's 1.6 unless the test is parametrized
    over releases (tests.support.containerd.EVERY_RELEASE)."""
    return getattr(request, "param", HOST)


@pytest.fixture
def containerd(containerd_release: Release) -> Iterator[PrivateContainerd]:
    ctd = PrivateContainerd(release=containerd_release).start()
    try:
        yield ctd
    finally:
        ctd.cleanup()
