"""What users and a hostile guest hand kata-py through containerd (#14): volumes at odd host paths
keep every byte after the task and the pod are gone, a read-only rootfs is read-only on the host,
and ids that would name a path elsewhere are refused before anything is touched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.support.containerd import RUNTIME, RUNTIME_HANDLER, PrivateContainerd
from tests.support.cri import CriClient, container_config, pod_config
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.vm]


def fill(volume: Path) -> str:
    volume.mkdir()
    (volume / "sub").mkdir()
    (volume / "sub" / "data").write_bytes(os.urandom(1 << 20))
    return tree_digest(volume)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(os.fsencode(path.relative_to(root)))
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def busybox(containerd: PrivateContainerd) -> str:
    return containerd.import_busybox()


def test_kill_and_remove_keep_a_non_ascii_volume(containerd: PrivateContainerd, busybox: str, tmp_path: Path):
    """The issue's report: a volume at /srv/vol-é was empty after kill + rm (mountinfo decoded with
    unicode_escape, so the mount was never taken off, and the state dir's removal went through it)."""
    volume = tmp_path / "vol-é x"
    before = fill(volume)
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--mount", f"type=bind,src={volume},dst=/data,options=rbind:rw",
                   busybox, "vol1", "sh", "-c", "echo guest > /data/written; sleep 600")
    wait_for(lambda: (volume / "written").exists(), 60, "the container wrote into the volume")
    containerd.ctr("tasks", "kill", "-s", "SIGKILL", "vol1")
    wait_for(lambda: b"STOPPED" in containerd.ctr("tasks", "ls").stdout, 30, "task stopped")
    containerd.ctr("tasks", "rm", "vol1")
    containerd.ctr("containers", "rm", "vol1")
    wait_for(lambda: not qemu_pids(containerd), 30, "QEMU gone")
    assert (volume / "written").read_text() == "guest\n"
    (volume / "written").unlink()
    assert tree_digest(volume) == before
    assert not list(containerd.kata_state.glob("sandboxes/*"))


def test_read_only_rootfs_is_read_only_on_the_host(containerd: PrivateContainerd, busybox: str):
    """`ctr run --read-only` hands the shim a read-only bind of the image's snapshot: the guest must
    not be able to write through it into a layer every container of that image shares."""
    result = containerd.ctr("run", "--rm", "--read-only", "--runtime", RUNTIME, busybox, "ro1", "sh", "-c",
                            "touch /probe 2>/dev/null && echo writable || echo read-only; "
                            "mount -o remount,rw / 2>/dev/null; touch /probe2 2>/dev/null && echo remounted; true",
                            check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr, containerd.log_tail())
    assert "read-only" in out and "remounted" not in out, out
    snapshots = containerd.dir / "root" / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    assert not list(snapshots.glob("*/fs/probe*")), "the guest wrote into an image layer"


@pytest.mark.parametrize("group", ["../../..", "a/b", "x\ny"])
def test_hostile_grouping_ids_are_refused_and_touch_nothing(containerd: PrivateContainerd, busybox: str, group: str):
    result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation", f"io.containerd.runc.v2.group={group}",
                            busybox, "grp1", "true", check=False)
    assert result.returncode != 0
    assert "not a valid identifier" in (result.stderr.decode() + containerd.log_tail(200)), result.stderr
    assert not containerd.kata_state.exists() or not list(containerd.kata_state.glob("sandboxes/*"))
    assert not qemu_pids(containerd)
    containerd.ctr("containers", "rm", "grp1", check=False)


def test_cri_volume_with_a_newline_keeps_every_byte(tmp_path: Path):
    ctd = PrivateContainerd(cri=True).start()
    try:
        image, _pause = ctd.import_cri_images()
        volume = tmp_path / "vol-é\nline x"
        before = fill(volume)
        with CriClient(ctd.cri_address) as client:
            pod = pod_config("odd-volume", uid="uid-odd")
            pod_id = client.run_pod_sandbox(pod, RUNTIME_HANDLER)
            try:
                cid = client.create_container(pod_id, container_config(
                    "c", image, ["sh", "-c", "cat /v/sub/data | wc -c; echo x > /v/from-guest; sleep 600"],
                    mounts={"/v": str(volume)}), pod)
                client.start_container(cid)
                wait_for(lambda: (volume / "from-guest").exists(), 60, "the container wrote into the volume")
                client.stop_container(cid, timeout_s=2)
                client.remove_container(cid)
            finally:
                client.stop_pod_sandbox(pod_id)
                client.remove_pod_sandbox(pod_id)
        wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")
        (volume / "from-guest").unlink()
        assert tree_digest(volume) == before
    finally:
        ctd.cleanup()
