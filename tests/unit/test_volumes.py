"""Which host mounts are Kubernetes emptyDirs and what the guest gets for them (shim/volumes.py)."""

from __future__ import annotations

import os
from pathlib import Path

from agent_client.protocol import Storage
from shim.volumes import HostDir, is_empty_dir, probe, storage_for

POD = "/var/lib/kubelet/pods/0a1b/volumes"


def test_empty_dir_paths() -> None:
    assert is_empty_dir(f"{POD}/kubernetes.io~empty-dir/cache")
    assert is_empty_dir(f"{POD}/kubernetes.io~empty-dir/cache/")
    assert not is_empty_dir(f"{POD}/kubernetes.io~empty-dir")
    assert not is_empty_dir(f"{POD}/kubernetes.io~configmap/cfg")
    assert not is_empty_dir(f"{POD}/kubernetes.io~empty-dir/cache/sub")  # a file inside: shared as usual
    assert not is_empty_dir("/data")


def test_memory_medium_becomes_a_guest_tmpfs_of_the_same_size_and_owner() -> None:
    host = HostDir(tmpfs=True, size_bytes=64 << 20, mode=0o41777, uid=0, gid=2000)
    assert storage_for(f"{POD}/kubernetes.io~empty-dir/cache", host) == Storage(
        driver="ephemeral", source="tmpfs", fstype="tmpfs", mount_point="/run/kata-py/sandbox/ephemeral/cache",
        options=("size=67108864", "mode=1777", "uid=0", "gid=2000"))


def test_disk_medium_becomes_a_guest_directory() -> None:
    host = HostDir(tmpfs=False, mode=0o40777, uid=0, gid=0)
    assert storage_for(f"{POD}/kubernetes.io~empty-dir/scratch", host) == Storage(
        driver="local", source="local", fstype="local", mount_point="/run/kata-py/sandbox/local/scratch",
        options=("mode=777", "uid=0", "gid=0"))


def test_probe_finds_a_tmpfs_mounted_exactly_there(tmp_path: Path) -> None:
    vol = tmp_path / "kubernetes.io~empty-dir" / "my cache"
    vol.mkdir(parents=True)
    vol.chmod(0o770)
    escaped = str(vol.resolve()).replace(" ", "\\040")
    info = tmp_path / "mountinfo"
    info.write_text(f"22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
                    f"99 22 0:55 / {escaped} rw,relatime shared:1 - tmpfs tmpfs rw,size=1024k\n")
    host = probe(str(vol), str(info))
    st = os.statvfs(vol)
    assert host == HostDir(tmpfs=True, size_bytes=st.f_blocks * st.f_frsize, mode=os.stat(vol).st_mode,
                           uid=os.getuid(), gid=os.getgid())
    assert host.mode & 0o7777 == 0o770
    info.write_text("22 1 0:21 / / rw - ext4 /dev/sda1 rw\n")
    assert probe(str(vol), str(info)).tmpfs is False
