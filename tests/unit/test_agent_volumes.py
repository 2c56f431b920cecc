"""Pod volumes in the agent (agent/volumes.py): one per pod, shared, removed with the last user."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import Internal, InvalidArgument
from agent.storage import Mounted, StorageSpec
from agent.volumes import PodVolumes


class Recorder:
    def __init__(self) -> None:
        self.mounted: list[str] = []
        self.unmounted: list[str] = []
        self.fail_unmount = False

    def mount(self, spec: StorageSpec, root: str, field: str) -> Mounted:
        Path(spec.mount_point).mkdir(parents=True, exist_ok=True)
        self.mounted.append(spec.mount_point)
        return Mounted(spec.driver, spec.mount_point, is_mount=spec.driver == "ephemeral")

    def unmount(self, m: Mounted) -> None:
        if self.fail_unmount:
            raise Internal(f"unmount {m.path}: busy")
        self.unmounted.append(m.path)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def volumes(tmp_path: Path, rec: Recorder) -> PodVolumes:
    return PodVolumes(str(tmp_path), mount=rec.mount, unmount=rec.unmount)


def eph(root: Path, name: str = "cache") -> StorageSpec:
    return StorageSpec("ephemeral", "tmpfs", "tmpfs", ["size=1048576"], [], str(root / "sandbox/ephemeral" / name))


def test_mounted_once_shared_and_removed_with_the_last_user(tmp_path: Path, volumes: PodVolumes,
                                                             rec: Recorder) -> None:
    path, added = volumes.acquire("c1", eph(tmp_path), "storages[0]")
    assert added and path == str(tmp_path / "sandbox/ephemeral/cache")
    assert volumes.acquire("c2", eph(tmp_path), "storages[0]") == (path, True)
    assert volumes.acquire("c2", eph(tmp_path), "storages[1]") == (path, False)  # named twice: one reference
    assert rec.mounted == [path]
    assert volumes.users() == {path: {"c1", "c2"}}
    volumes.release("c1")
    assert rec.unmounted == [] and volumes.users() == {path: {"c2"}}
    volumes.release("c1")  # again: nothing
    volumes.release("c2")
    assert rec.unmounted == [path] and volumes.users() == {}
    assert not Path(path).exists()  # the empty mount point goes too
    # a later container makes it anew
    volumes.acquire("c3", eph(tmp_path), "storages[0]")
    assert rec.mounted == [path, path]


def test_release_of_some_paths_only(tmp_path: Path, volumes: PodVolumes, rec: Recorder) -> None:
    a, _ = volumes.acquire("c1", eph(tmp_path, "a"), "s")
    b, _ = volumes.acquire("c1", eph(tmp_path, "b"), "s")
    volumes.release("c1", [b])  # what a failed create took, and no more
    assert volumes.users() == {a: {"c1"}}


def test_refused_mount_points_and_drivers(tmp_path: Path, volumes: PodVolumes, rec: Recorder) -> None:
    bad = [
        StorageSpec("local", mount_point=str(tmp_path / "containers")),  # would rmtree the agent's state
        StorageSpec("local", mount_point=str(tmp_path / "sandbox/local/a/b")),
        StorageSpec("local", mount_point=str(tmp_path / "sandbox/ephemeral/x")),  # another driver's place
        StorageSpec("local", mount_point=str(tmp_path / "sandbox/local/..")),
        StorageSpec("local", mount_point="/etc"),
        StorageSpec("9p", source="tag", mount_point=str(tmp_path / "sandbox/9p/x")),
    ]
    for spec in bad:
        with pytest.raises(InvalidArgument):
            volumes.acquire("c1", spec, "storages[0]")
    assert rec.mounted == []
    volumes.acquire("c1", eph(tmp_path, "same"), "s")
    local_with_eph_path = StorageSpec("local", mount_point=str(tmp_path / "sandbox/local/same"))
    volumes.acquire("c1", local_with_eph_path, "s")  # a different place: fine


def test_unmount_failure_is_reported_after_all_are_released(tmp_path: Path, volumes: PodVolumes,
                                                            rec: Recorder) -> None:
    volumes.acquire("c1", eph(tmp_path, "a"), "s")
    volumes.acquire("c1", eph(tmp_path, "b"), "s")
    rec.fail_unmount = True
    with pytest.raises(Internal, match="busy"):
        volumes.release("c1")
    assert volumes.users() == {}
