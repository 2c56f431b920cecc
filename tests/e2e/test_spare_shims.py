"""Spare shim daemons (issue #9): `kata-py pool` keeps shims that already imported their code, and
containerd's `start` hands the pod to one instead of starting Python; the pool refills, and nothing
is left once the pool stops. The first test needs no VM (the spare serves, the missing guest is the
error containerd sees); the second runs a container from the pool's VM through its spare shim."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.containerd import RUNTIME, PrivateContainerd

pytestmark = pytest.mark.containerd


def pool_status(sock: Path) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b'{"op": "status"}\n')
        return json.loads(s.makefile().readline())


def start_pool(ctd: PrivateContainerd, sock: Path, size: int, shims: int) -> subprocess.Popen[bytes]:
    log = open(ctd.dir / "pool.log", "ab")  # noqa: SIM115 (the child's for its lifetime)
    proc = subprocess.Popen([sys.executable, "-m", "shim.cli", "--config", str(ctd.kata_config), "pool",
                             "--socket", str(sock), "--size", str(size), "--shims", str(shims)],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (ctd.dir / "pool.log").read_text()[-3000:]
        time.sleep(0.1)
    return proc


def stop_pool(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def spare_timings(ctd: PrivateContainerd) -> list[str]:
    return re.findall(r"timing shim=\S+ pid=\d+ .*", ctd.log.read_text())


@pytest.fixture
def pool_containerd(tmp_path: Path):
    empty = tmp_path / "no-guest"
    empty.mkdir()
    holder: dict[str, PrivateContainerd] = {}

    def make(guest: bool) -> tuple[PrivateContainerd, Path]:
        sock = tmp_path / "pool" / "pool.sock"
        guest_line = "" if guest else f'[hypervisor]\nguest_dir = "{empty}"\n'
        ctd = PrivateContainerd(kata_config=f'{guest_line}[factory]\npool_socket = "{sock}"\n').start()
        holder["ctd"] = ctd
        return ctd, sock

    yield make
    if "ctd" in holder:
        holder["ctd"].cleanup()


def test_start_hands_the_pod_to_a_spare_and_the_pool_refills(pool_containerd) -> None:
    ctd, sock = pool_containerd(guest=False)
    pool = start_pool(ctd, sock, size=0, shims=1)
    try:
        assert pool_status(sock)["shims"] == 1
        spare_dir = sock.parent / "spares"
        assert oct(spare_dir.stat().st_mode & 0o777) == "0o700"
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in spare_dir.glob("*.sock"))
        image = ctd.import_busybox()
        result = ctd.ctr("run", "--rm", "--runtime", RUNTIME, image, "spare1", "true", check=False)
        # the spare served the Task API: our error, over our ttrpc, as containerd renders it
        assert result.returncode != 0 and "guest image not built" in result.stderr.decode(), result.stderr
        shim_lines = spare_timings(ctd)
        assert shim_lines and "spare=1" in shim_lines[-1], ctd.log_tail()
        deadline = time.monotonic() + 30
        while pool_status(sock)["shims"] != 1:  # refilled
            assert time.monotonic() < deadline, "the pool did not start another spare"
            time.sleep(0.1)
    finally:
        stop_pool(pool)
    assert not ctd.stray_processes()
    assert not (sock.parent / "spares").exists()  # the pool removed its spares' directory


def test_without_a_spare_start_spawns_the_daemon(pool_containerd) -> None:
    ctd, sock = pool_containerd(guest=False)
    pool = start_pool(ctd, sock, size=0, shims=0)
    try:
        image = ctd.import_busybox()
        result = ctd.ctr("run", "--rm", "--runtime", RUNTIME, image, "nospare", "true", check=False)
        assert "guest image not built" in result.stderr.decode(), result.stderr
        shim_lines = spare_timings(ctd)
        assert shim_lines and "spare=1" not in shim_lines[-1], ctd.log_tail()
    finally:
        stop_pool(pool)


@pytest.mark.vm
def test_ctr_run_from_the_pool_vm_through_a_spare_shim(pool_containerd) -> None:
    ctd, sock = pool_containerd(guest=True)
    pool = start_pool(ctd, sock, size=1, shims=1)
    try:
        image = ctd.import_busybox()
        result = ctd.ctr("run", "--rm", "--runtime", RUNTIME, image, "spare-vm", "sh", "-c", "echo hi-from-vm")
        assert result.stdout.decode().strip() == "hi-from-vm"
        log = ctd.log.read_text()
        assert "spare=1" in spare_timings(ctd)[-1]
        assert re.search(r"timing sandbox=spare-vm .*boot=pool", log), ctd.log_tail()
    finally:
        stop_pool(pool)
    assert not ctd.stray_processes()
