"""`ctr run --log-uri`: containerd hands the shim a binary:// logger (or a file:// log) instead of fifos;
the container's output, from a real VM, reaches it byte for byte and the logger is gone when ctr returns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.containerd import NAMESPACE, RUNTIME, PrivateContainerd
from tests.support.loggers import install_recorder
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.vm]

# every byte value a shell can print, a large stdout (more than any pipe holds) and a separate stderr
SCRIPT = r"printf 'bin:\000\001\377\r\n'; seq 1 20000; printf 'err-1\n' >&2; printf 'err-2 no newline' >&2; exit 5"
EXPECTED_OUT = b"bin:\x00\x01\xff\r\n" + b"".join(b"%d\n" % i for i in range(1, 20001))
EXPECTED_ERR = b"err-1\nerr-2 no newline"


@pytest.fixture
def busybox(containerd: PrivateContainerd) -> str:
    return containerd.import_busybox()


def test_binary_logger_gets_stdout_and_stderr_exactly(containerd: PrivateContainerd, busybox: str, tmp_path: Path):
    logs = tmp_path / "logs"
    logs.mkdir()
    logger = install_recorder(tmp_path / "logger")
    result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--log-uri", f"binary://{logger}?dir={logs}",
                            busybox, "logged", "sh", "-c", SCRIPT, check=False)
    assert result.returncode == 5, (result, containerd.log_tail())
    assert result.stdout == b""  # ctr got no fifos: everything went to the logger
    assert (logs / "stdout").read_bytes() == EXPECTED_OUT
    assert (logs / "stderr").read_bytes() == EXPECTED_ERR
    info = json.loads((logs / "info.json").read_text())
    assert info["argv"][1:] == ["dir", str(logs)]
    assert info["env"] == {"CONTAINER_ID": "logged", "CONTAINER_NAMESPACE": NAMESPACE}
    assert sorted(map(int, info["fds"])) == [0, 1, 2, 3, 4, 5], info["fds"]
    # the shim waited for the logger before it reported the exit: done, exited and reaped
    assert (logs / "done").exists()
    assert not os.path.exists(f"/proc/{info['pid']}")
    wait_for(lambda: not qemu_pids(containerd), timeout=30, what="QEMU gone")


def test_a_loggers_orphans_are_not_left_as_zombies(containerd: PrivateContainerd, busybox: str, tmp_path: Path):
    """The shim is no child subreaper: a grandchild a logger orphans goes to init, which reaps it
    (adopted by the shim, which waits only for its own children, it would stay a zombie)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    logger = install_recorder(tmp_path / "logger")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--log-uri", f"binary://{logger}?dir={logs}&orphan=1",
                   busybox, "orphans", "sleep", "60")
    try:
        pid = wait_for(lambda: (logs / "orphan.pid").exists() and int((logs / "orphan.pid").read_text()),
                       timeout=60, what="the orphan's pid")
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=15, what=f"orphan {pid} reaped")
    finally:
        containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "orphans", check=False)
        wait_for(lambda: containerd.ctr("tasks", "ls", check=False).stdout.count(b"orphans") == 0
                 or b"STOPPED" in containerd.ctr("tasks", "ls", check=False).stdout, timeout=30, what="stopped")
        containerd.ctr("tasks", "delete", "orphans", check=False)
        containerd.ctr("containers", "delete", "orphans", check=False)
    wait_for(lambda: not qemu_pids(containerd), timeout=30, what="QEMU gone")


def test_file_log_uri_appends_both_streams(containerd: PrivateContainerd, busybox: str, tmp_path: Path):
    log = tmp_path / "new-dir" / "c.log"  # its directory is made
    result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--log-uri", f"file://{log}",
                            busybox, "filelog", "sh", "-c", "echo to-out; echo to-err >&2", check=False)
    assert result.returncode == 0, (result, containerd.log_tail())
    assert sorted(log.read_bytes().splitlines()) == [b"to-err", b"to-out"]


@pytest.mark.parametrize("uri, message", [
    ("binary:///no/such/logger", "logging binary /no/such/logger: No such file or directory"),
    ("file://relative/c.log", "names host 'relative'"),
])
def test_bad_log_uris_are_readable_invalid_arguments(containerd: PrivateContainerd, busybox: str, uri: str,
                                                     message: str):
    result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--log-uri", uri, busybox, "refused", "true",
                            check=False)
    err = result.stderr.decode()
    assert result.returncode != 0
    assert message in err and "invalid argument" in err, err
    assert "refused" not in containerd.ctr("tasks", "ls").stdout.decode()
    wait_for(lambda: not qemu_pids(containerd), timeout=30, what="QEMU gone")
