"""`kata-py check` (can this host run kata-py?) and `kata-py env` (what runtime, on what host).

`probe.Probe` does the I/O and records `facts`; `checks` judges them (pure, so unit tests feed made-up
facts); `report` renders. `check` exits 0 when the host can run pods (warnings allowed), else 1.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import Config
from . import report
from .checks import host_ok, run_checks
from .probe import DEFAULT_CONTAINERD_CONFIG, Probe

LIBRARIES = ("trio", "grpcio", "protobuf", "qemu.qmp", "pyroute2", "trio-asyncio")


def runtime_versions() -> dict[str, Any]:
    """kata-py, Python, the libraries it runs on, the host kernel."""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"kata-py": version("kata-py"), "kata-py-path": str(Path(__file__).resolve().parents[1]),
            "python": platform.python_version(), "python-executable": sys.executable,
            "libraries": {lib: version(lib) for lib in LIBRARIES}, "kernel": platform.release(),
            "arch": platform.machine(), "cpus": os.cpu_count()}


def run_check(config: Config, config_error: str = "", containerd_config: str = DEFAULT_CONTAINERD_CONFIG,
              as_json: bool = False) -> tuple[str, int]:
    """(the report, the exit code)."""
    t0 = time.monotonic()
    results = run_checks(Probe(config, config_error, containerd_config).gather())
    elapsed = time.monotonic() - t0
    text = (report.check_json(results, elapsed, runtime_versions()) if as_json
            else report.check_text(results, elapsed))
    return text, 0 if host_ok(results) else 1


def run_env(config: Config, config_error: str = "", containerd_config: str = DEFAULT_CONTAINERD_CONFIG,
            as_json: bool = False) -> str:
    import json

    info = report.env_info(Probe(config, config_error, containerd_config).gather(), runtime_versions())
    return json.dumps(info, indent=2) + "\n" if as_json else report.env_text(info)
