"""The template cache on disk (issue #9): atomic commit, validation that never lets a truncated or
corrupted template be used, size cap, list/clear, the build lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.factory.store import RAM_FILE, STATE_FILE, TemplateInvalid, TemplateStore

MIB = 1 << 20


def build(store: TemplateStore, key: str, ram_mib: int = 8, written_mib: int = 1) -> None:
    staging = store.staging_dir(key)
    (staging / STATE_FILE).write_bytes(os.urandom(4096))
    with open(staging / RAM_FILE, "wb") as f:  # sparse like a real RAM file: only touched pages exist
        f.truncate(ram_mib * MIB)
        f.write(os.urandom(written_mib * MIB))
    store.commit(key, staging, {"what": "test"})


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


def test_commit_then_lookup(store: TemplateStore):
    assert store.lookup("k1") is None
    build(store, "k1")
    t = store.lookup("k1")
    assert t is not None and t.meta["what"] == "test" and t.ram.stat().st_size == 8 * MIB
    assert not list(store.root.glob(".build-*")), "staging dir left behind"
    assert oct(store.root.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("damage", ["truncate_state", "truncate_ram", "flip_state", "flip_ram", "no_meta",
                                    "bad_meta", "no_ram"])
def test_damaged_template_is_detected_and_removed(store: TemplateStore, damage: str):
    build(store, "k1")
    path = store.root / "k1"
    for f in path.iterdir():
        f.chmod(0o600)
    if damage == "truncate_state":
        os.truncate(path / STATE_FILE, 100)
    elif damage == "truncate_ram":
        os.truncate(path / RAM_FILE, 4 * MIB)
    elif damage in ("flip_state", "flip_ram"):
        target = path / (STATE_FILE if damage == "flip_state" else RAM_FILE)
        with open(target, "r+b") as f:
            f.seek(0)
            byte = f.read(1)
            f.seek(0)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "no_meta":
        (path / "meta.json").unlink()
    elif damage == "bad_meta":
        (path / "meta.json").write_text("{not json")
    else:
        (path / RAM_FILE).unlink()
    with pytest.raises(TemplateInvalid):
        store.validate("k1")
    assert store.lookup("k1") is None
    assert not path.exists(), "a broken template must be removed so it gets rebuilt"


def test_uncommitted_build_is_invisible_and_cleared(store: TemplateStore):
    staging = store.staging_dir("k1")
    (staging / STATE_FILE).write_bytes(b"half")
    assert store.lookup("k1") is None and store.list() == []
    os.utime(staging, (0, 0))
    store.remove_stale_builds()
    assert not staging.exists()


def test_size_cap_evicts_oldest_first(store: TemplateStore):
    store.max_bytes = int(2.5 * MIB)
    for k in ("old", "mid", "new"):
        build(store, k)
    assert [t.key for t in store.list()] == ["mid", "new"]


def test_recommit_replaces_and_clear_removes_all(store: TemplateStore):
    build(store, "k1")
    first = store.lookup("k1")
    build(store, "k1")
    second = store.lookup("k1")
    assert first and second and second.meta["state_sha256"] != first.meta["state_sha256"]
    build(store, "k2")
    store.staging_dir("k3")
    assert store.clear() == 2
    assert store.list() == [] and not list(store.root.glob(".build-*"))


def test_build_lock_is_exclusive(store: TemplateStore):
    with store.try_lock("k1") as first:
        with store.try_lock("k1") as second, store.try_lock("k2") as other:
            assert first and not second and other
    with store.try_lock("k1") as again:
        assert again
