"""A clone warms itself up only while nobody uses it (agent/warm_up.py WarmUp.clones)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from agent import warm_up


class FakeAgent:
    def __init__(self) -> None:
        self.warmed = threading.Event()

    def clone(self, until: threading.Event | None = None) -> None:
        self.warmed.set()


@pytest.mark.parametrize("host_came", [False, True], ids=["unused clone", "clone in use"])
def test_warm_up_runs_only_if_the_host_has_not_connected(monkeypatch: pytest.MonkeyPatch, host_came: bool) -> None:
    monkeypatch.setattr(warm_up, "CLONE_WARM_UP_DELAY_S", 0.05)
    connected = threading.Event()
    if host_came:
        connected.set()
    fake = FakeAgent()
    warm_up.WarmUp.clones(fake, connected)  # type: ignore[arg-type]
    time.sleep(0.3)
    assert fake.warmed.is_set() is not host_came


def test_the_9p_look_holds_the_lock_a_pods_9p_mount_takes(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # one mount per virtio-9p channel: CreateSandbox's mount of the share would fail with EBUSY
    # while the warm-up has it mounted, so both take agent.storage.NINEP_MOUNT_LOCK
    from agent import mounts, storage

    tag = tmp_path / "virtio3" / "mount_tag"
    tag.parent.mkdir()
    tag.write_text("kataShared\0")
    monkeypatch.setattr(warm_up, "NINEP_TAGS", str(tmp_path / "virtio*" / "mount_tag"))
    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(mounts, "mount", lambda src, *a, **k: seen.append((src, storage.NINEP_MOUNT_LOCK.locked())))
    monkeypatch.setattr(mounts, "umount", lambda *a, **k: seen.append(("umount", storage.NINEP_MOUNT_LOCK.locked())))

    class Root:
        root = str(tmp_path / "agent-root")

    warm_up.WarmUp._ninep(Root(), logging.getLogger("t"))  # type: ignore[arg-type]
    assert seen == [("kataShared", True), ("umount", True)]
    assert not storage.NINEP_MOUNT_LOCK.locked()
