"""`kata-py pool` fails with its one-line error and status 1 when it cannot serve (here: no guest
image), not with a traceback of an exception group (trio >= 0.25 nurseries wrap every error)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from shim.config import Config, HypervisorConfig, RuntimeConfig
from shim.factory.pool import run_pool


def test_no_guest_image_is_a_clear_error_and_status_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = dataclasses.replace(
        Config(), hypervisor=HypervisorConfig(guest_dir=str(tmp_path / "no-guest"), accel="tcg"),
        runtime=RuntimeConfig(state_dir=str(tmp_path / "state")))
    with caplog.at_level(logging.ERROR, logger="shim.factory.pool"):
        assert run_pool(config, socket_path=str(tmp_path / "pool" / "pool.sock"), size=1, shims=0) == 1
    assert "guest image not built" in caplog.text
