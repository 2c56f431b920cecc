"""Fixtures for the Go ttrpc interop tests (marked `go`).

A missing Go toolchain or ttrpc sources is a test *failure* (CI installs golang-go); set
KATA_PY_SKIP_GO=1 to skip these tests on a machine without Go.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .gopeer import build_go_peer, go_server


def _skip_go() -> bool:
    return os.environ.get("KATA_PY_SKIP_GO") == "1"


@pytest.fixture(scope="session")
def go_peer() -> Path:
    if _skip_go():
        pytest.skip("KATA_PY_SKIP_GO=1")
    return build_go_peer()  # raises GoPeerUnavailable (a failure) when Go is missing


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="ttrpc-go-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def go_server_socket(go_peer: Path) -> Iterator[str]:
    """Path of a Go ttrpc server (gottrpc) socket shared by a module's tests."""
    directory = tempfile.mkdtemp(prefix="ttrpc-go-", dir="/tmp")
    path = os.path.join(directory, "go.sock")
    try:
        with go_server(go_peer, path):
            yield path
    finally:
        shutil.rmtree(directory)
