"""containerd 1.6 drives our shim binary for real: start, ttrpc, errors, delete, cleanup."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.containerd import RUNTIME, PrivateContainerd

pytestmark = pytest.mark.containerd


@pytest.fixture
def no_guest_containerd(tmp_path) -> PrivateContainerd:
    empty = tmp_path / "no-guest"
    empty.mkdir()
    ctd = PrivateContainerd(kata_config=f'[hypervisor]\nguest_dir = "{empty}"\n').start()
    try:
        yield ctd
    finally:
        ctd.cleanup()


def test_missing_guest_is_a_readable_ctr_error_and_nothing_is_left(no_guest_containerd: PrivateContainerd):
    ctd = no_guest_containerd
    image = ctd.import_busybox()
    sockets_before = set(os.listdir("/run/containerd/s")) if os.path.isdir("/run/containerd/s") else set()
    result = ctd.ctr("run", "--rm", "--runtime", RUNTIME, image, "lonely", "echo", "hi", check=False)
    err = result.stderr.decode()
    assert result.returncode != 0
    # our FailedPrecondition travelled over our ttrpc and containerd rendered it
    assert "guest image not built" in err, err
    assert "failed precondition" in err, err
    # containerd ran Delete + Shutdown; the shim exited and removed its socket; the bundle is gone
    tasks = ctd.ctr("tasks", "ls").stdout.decode()
    assert "lonely" not in tasks
    containers = ctd.ctr("containers", "ls", "-q").stdout.decode().split()
    assert "lonely" not in containers  # --rm
    sockets_after = set(os.listdir("/run/containerd/s")) if os.path.isdir("/run/containerd/s") else set()
    assert sockets_after <= sockets_before
    # containerd removes the bundle after our `delete` action returns, asynchronously to ctr
    bundles = ctd.dir / "state" / "io.containerd.runtime.v2.task"
    deadline = time.monotonic() + 10
    while any(bundles.rglob("config.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(bundles.rglob("config.json"))


def test_shim_version_flag():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "shim", "-v"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("containerd-shim-kata-py-v2 version")
