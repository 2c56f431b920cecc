"""End-to-end tests start from a template, as users do after install (`kata-py template build`).

Without one, the first sandbox of each VM shape boots cold and its shim builds the template in the
background after its pod ended (issue #9): that shim would outlive the test that started it. So the
session builds, once and before any e2e test, the templates of the two shapes the tests use: the
default configuration (VmSandbox tests) and PrivateContainerd's (debug on, which puts the guest log
level on the kernel command line). Both are cached by key in the shared template directory, so a
warm machine pays ~1 s here. tests/e2e/test_factory_templates.py covers the cold + background path
with its own template directory.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import PrivateContainerd
from tests.support.containerd_releases import Release
from tests.support.cri import CriClient, private_cri

SHAPES = {"default": "", "PrivateContainerd (debug)": "debug = true\n"}


@pytest.fixture(scope="session", autouse=True)
def templates_built() -> None:
    with tempfile.TemporaryDirectory(prefix="kpt-") as tmp:
        for name, extra in SHAPES.items():
            config = Path(tmp) / "kata-py.toml"
            config.write_text(f'[runtime]\nstate_dir = "{tmp}/k"\n{extra}')
            done = subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(config), "template", "build"],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                pytest.fail(f"building the {name} template failed:\n{done.stdout}{done.stderr}")
            print(f"[e2e] {done.stdout.strip()}", file=sys.stderr)


@pytest.fixture
def cri_env(containerd_release: Release) -> Iterator[tuple[PrivateContainerd, CriClient, str]]:
    """(containerd, CRI client, busybox image) of a private containerd with CRI, for the release the
    test runs against (the host's unless parametrized)."""
    with private_cri(release=containerd_release) as env:
        yield env
