"""A clone warms itself up only while nobody uses it (agent/app.py Agent.warm_up_clones)."""

from __future__ import annotations

import threading
import time

import pytest

from agent import app


class FakeAgent:
    def __init__(self) -> None:
        self.warmed = threading.Event()

    def run_clone_warm_up(self) -> None:
        self.warmed.set()


@pytest.mark.parametrize("host_came", [False, True], ids=["unused clone", "clone in use"])
def test_warm_up_runs_only_if_the_host_has_not_connected(monkeypatch: pytest.MonkeyPatch, host_came: bool) -> None:
    monkeypatch.setattr(app, "CLONE_WARM_UP_DELAY_S", 0.05)
    connected = threading.Event()
    if host_came:
        connected.set()
    fake = FakeAgent()
    app.Agent.warm_up_clones(fake, connected)  # type: ignore[arg-type]
    time.sleep(0.3)
    assert fake.warmed.is_set() is not host_came
