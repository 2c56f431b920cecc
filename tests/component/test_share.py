"""The host side of the guest share with real mounts (root): the exported view is read-only, what is
attached has its own flags, teardown takes off exactly what was attached and never touches data
behind a mount or a link. What the guest would write is written here through the exported path,
as QEMU's 9p server would."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from shim import mounts
from shim.errors import Internal
from shim.share import GUEST_SHARED, GuestShare, detach

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")

ODD_NAMES = ["vol-é", "with space", "new\nline", "tab\there", "back\\slash"]


@pytest.fixture
def share(tmp_path: Path):
    s = GuestShare(tmp_path / "state")
    s.create()
    yield s
    s.close()
    assert not mounts.mount_points_under(tmp_path), "share left mounts"
    assert mounts.remove_tree(tmp_path / "state") == []


def volume(tmp_path: Path, name: str = "vol") -> Path:
    vol = tmp_path / name
    vol.mkdir()
    (vol / "data").write_bytes(b"user data\n" * 100)
    return vol


def flags_of(path: Path) -> int:
    return os.statvfs(path).f_flag


def test_exported_view_is_read_only_and_inert(share: GuestShare):
    assert share.is_mounted()
    f = flags_of(share.exported)
    assert f & os.ST_RDONLY and f & os.ST_NOSUID and f & os.ST_NODEV and f & os.ST_NOEXEC
    for attempt in (lambda: (share.exported / "evil").write_text("x"),
                    lambda: (share.exported / "containers").mkdir(),
                    lambda: (share.exported / "link").symlink_to("/")):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS
    (share.stage / "host-only").mkdir()  # the host's own tree stays writable...
    assert (share.exported / "host-only").is_dir()  # ...and the guest sees it, read-only


def test_rw_volume_is_writable_but_nosuid_nodev(share: GuestShare, tmp_path: Path):
    vol = volume(tmp_path)
    guest_path = share.share_volume("c1", 0, str(vol), readonly=False)
    assert guest_path == f"{GUEST_SHARED}/containers/c1/mounts/0"
    seen = share.exported / "containers/c1/mounts/0"
    (seen / "new").write_text("from the guest")
    assert (vol / "new").read_text() == "from the guest"
    f = flags_of(seen)
    assert not f & os.ST_RDONLY and f & os.ST_NOSUID and f & os.ST_NODEV
    assert not mounts.is_mount_point(share.stage / "containers/c1/mounts/0"), "attached on the view only"


def test_read_only_volume_is_read_only_down_to_its_submounts(share: GuestShare, tmp_path: Path):
    vol = volume(tmp_path)
    (vol / "sub").mkdir()
    mounts.mount("tmpfs", str(vol / "sub"), "tmpfs", 0, "size=1m")
    try:
        share.share_volume("c1", 0, str(vol), readonly=True)
        seen = share.exported / "containers/c1/mounts/0"
        for path in (seen, seen / "sub"):
            assert flags_of(path) & os.ST_RDONLY, path
            with pytest.raises(OSError) as err:
                (path / "x").write_text("x")
            assert err.value.errno == errno.EROFS
        assert not flags_of(vol / "sub") & os.ST_RDONLY, "the host's own mount is untouched"
        share.unshare("c1")
        assert mounts.is_mount_point(vol / "sub"), "unshare took off the host's own submount"
    finally:
        mounts.umount(vol / "sub")


@pytest.mark.parametrize("follow_host, readonly, propagates", [
    (True, False, True),  # rslave / rshared (kubelet's HostToContainer, Bidirectional)
    (False, False, False),  # rprivate, the default
    (True, True, False),  # read-only never follows: a mount arriving later would be writable
])
def test_host_mounts_made_later_reach_a_following_volume_only(share: GuestShare, tmp_path: Path,
                                                              follow_host: bool, readonly: bool, propagates: bool):
    vol = volume(tmp_path)
    (vol / "later").mkdir()
    mounts.mount(str(vol), str(vol), "", mounts.MS_BIND)  # as critest and kubelet make it: a shared mount
    mounts.mount("", str(vol), "", mounts.MS_SHARED)
    try:
        share.share_volume("c1", 0, str(vol), readonly=readonly, follow_host=follow_host)
        seen = share.exported / "containers/c1/mounts/0"
        mounts.mount("tmpfs", str(vol / "later"), "tmpfs", 0, "size=1m")
        (vol / "later" / "flag").write_text("from the host")
        assert (seen / "later" / "flag").exists() is propagates
        if propagates:  # a slave: the guest's side can make nothing appear on the host's
            mounts.mount("tmpfs", str(seen / "later"), "tmpfs", 0, "size=1m")
            assert (vol / "later" / "flag").exists()
            mounts.umount(seen / "later")
        share.unshare("c1")
        assert (vol / "later" / "flag").read_text() == "from the host", "unshare took the host's mount"
    finally:
        mounts.umount(vol)
    assert (vol / "data").read_bytes() == b"user data\n" * 100


def test_file_volume(share: GuestShare, tmp_path: Path):
    f = tmp_path / "resolv.conf"
    f.write_text("nameserver 127.0.0.1\n")
    share.share_volume("c1", 3, str(f), readonly=True)
    seen = share.exported / "containers/c1/mounts/3"
    assert seen.read_text() == "nameserver 127.0.0.1\n"
    with pytest.raises(OSError):
        seen.write_text("x")
    share.unshare("c1")
    assert f.read_text() == "nameserver 127.0.0.1\n"
    assert not (share.stage / "containers/c1").exists()


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_volume_paths_keep_every_byte(share: GuestShare, tmp_path: Path, name: str):
    vol = volume(tmp_path, name)
    share.share_volume("c1", 0, str(vol), readonly=False)
    assert str(share.exported / "containers/c1/mounts/0") in mounts.mount_points_under(share.exported)
    share.close()
    assert (vol / "data").read_bytes() == b"user data\n" * 100
    assert mounts.remove_tree(share.state_dir) == []
    assert (vol / "data").read_bytes() == b"user data\n" * 100


def test_unshare_does_not_follow_what_the_guest_planted(share: GuestShare, tmp_path: Path):
    vol = volume(tmp_path)
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    share.share_volume("c1", 0, str(vol), readonly=False)
    seen = share.exported / "containers/c1/mounts/0"
    # a guest root writes links to host paths into what it can write
    (seen / "to-canary").symlink_to(canary)
    (seen / "to-root").symlink_to("/")
    os.rename(seen / "data", seen / "renamed")
    share.unshare("c1")
    share.close()
    assert (canary / "keep").read_text() == "keep"
    assert (vol / "renamed").read_bytes() == b"user data\n" * 100
    assert (vol / "to-canary").is_symlink()


def test_a_container_id_cannot_be_attached_twice(share: GuestShare, tmp_path: Path):
    share.share_rootfs("c1", volume(tmp_path), readonly=False)
    with pytest.raises(Internal):
        share.share_rootfs("c1", tmp_path, readonly=False)


def test_detach_needs_no_record(tmp_path: Path):
    """What `delete` does after a killed shim: one detach takes the share off with all below it."""
    s = GuestShare(tmp_path / "state")
    s.create()
    vol = volume(tmp_path)
    s.share_volume("c1", 0, str(vol), readonly=False)
    s.share_rootfs("c2", volume(tmp_path, "root2"), readonly=True)
    detach(s.state_dir)
    assert not mounts.mount_points_under(s.state_dir)
    assert mounts.remove_tree(s.state_dir) == []
    assert (vol / "data").read_bytes() == b"user data\n" * 100


def test_remove_tree_never_enters_a_mount_nor_follows_a_link(tmp_path: Path):
    state = tmp_path / "state"
    (state / "a").mkdir(parents=True)
    vol = volume(tmp_path)
    (state / "a" / "mnt").mkdir()
    (state / "link").symlink_to(vol)
    mounts.bind(vol, state / "a" / "mnt", readonly=False, recursive=True)
    try:
        left = mounts.remove_tree(state)
        assert left == [str(state / "a" / "mnt")]
        assert (vol / "data").read_bytes() == b"user data\n" * 100
        assert not (state / "link").exists()
    finally:
        mounts.umount(state / "a" / "mnt")
    assert mounts.remove_tree(state) == []
    assert not state.exists() and (vol / "data").exists()


def test_open_beneath_refuses_links_escapes_and_mount_crossings(tmp_path: Path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "ln").symlink_to("e")
    (tmp_path / "m").mkdir()
    mounts.mount("tmpfs", str(tmp_path / "m"), "tmpfs", 0, "size=1m")
    (tmp_path / "m" / "x").mkdir()
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        os.close(mounts.open_beneath(fd, "d/e"))
        for rel, code in (("d/ln", errno.ELOOP), ("../", errno.EXDEV), ("m/x", errno.EXDEV)):
            with pytest.raises(OSError) as err:
                mounts.open_beneath(fd, rel)
            assert err.value.errno == code, rel
    finally:
        os.close(fd)
        mounts.umount(tmp_path / "m")


def test_read_only_bind_is_read_only_from_the_start(tmp_path: Path):
    vol = volume(tmp_path)
    (tmp_path / "t").mkdir()
    mounts.bind(vol, tmp_path / "t", readonly=True, recursive=False)
    try:
        assert flags_of(tmp_path / "t") & os.ST_RDONLY
        assert stat.S_ISDIR(os.lstat(tmp_path / "t").st_mode)
    finally:
        mounts.umount(tmp_path / "t")


def test_read_only_rootfs_gets_a_scratch_layer_and_its_image_stays_untouched(share: GuestShare, tmp_path: Path):
    layer = volume(tmp_path, "layer")
    (tmp_path / "ro").mkdir()
    mounts.bind(layer, tmp_path / "ro", readonly=True, recursive=False)  # what containerd's View gives
    try:
        share.share_rootfs("c1", tmp_path / "ro", readonly=True)
        seen = share.exported / "containers/c1/rootfs"
        (seen / "run").mkdir()  # the guest runtime's mount point
        (seen / "data").write_bytes(b"overwritten")
        assert sorted(os.listdir(layer)) == ["data"] and (layer / "data").read_bytes() == b"user data\n" * 100
        with pytest.raises(OSError) as err:  # a guest root fills at most the bounded scratch tmpfs
            (seen / "big").write_bytes(b"\0" * (17 << 20))
        assert err.value.errno == errno.ENOSPC
        share.unshare("c1")
        assert not (share.scratch / "c1").exists()
    finally:
        mounts.umount(tmp_path / "ro")
