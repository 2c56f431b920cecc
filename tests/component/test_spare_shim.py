"""A spare shim daemon on its own (shim/spare.py): it serves only after `start` confirmed, exits when
its pool is gone, joins the starter's cgroups and takes the daemon's command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim import spare
from shim.args import spare_argv

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_spare(sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(spare_argv(str(sock)), cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: sock.exists() or proc.poll() is not None, 60, "the spare's socket")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def test_spare_socket_is_private_and_a_hand_off_without_go_ends_the_spare(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = start_spare(sock)
    try:
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / "ttrpc.sock"))
        listener.listen(1)
        with listener, socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(str(sock))
            message = json.dumps({"argv": ["-namespace", "n", "-id", "x"], "cwd": str(tmp_path), "env": {}})
            socket.send_fds(conn, [message.encode() + b"\n"], [listener.fileno()])
            reply = json.loads(conn.makefile().readline())
            assert reply == {"ok": True, "pid": proc.pid}
            # `start` gives up here (no "go"): the spare must not serve the socket
        assert proc.wait(timeout=10) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_malformed_hand_off_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = start_spare(sock)
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(str(sock))
            conn.sendall(b'{"argv": "not a list"}\n')  # and no listening socket
            reply = json.loads(conn.makefile().readline())
        assert reply["ok"] is False and reply["reason"]
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_spare_whose_pool_died_exits(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    argv = " ".join(f"'{a}'" for a in spare_argv(str(sock)))
    # the "pool" is a shell that starts the spare, waits for its socket and dies
    pool = subprocess.run(["sh", "-c", f"{argv} >/dev/null 2>&1 & echo $!; "
                           f"while [ ! -S '{sock}' ]; do sleep 0.05; done"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    pid = int(pool.stdout.strip())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes(),
             10, "the orphaned spare to exit")
    assert not sock.exists()


def test_set_cmdline_shows_the_daemons_arguments(tmp_path: Path) -> None:
    code = ("import sys; from shim import spare; spare.set_cmdline(['python3', '-m', 'shim', '-id', 'pod-1']);"
            "print(open('/proc/self/cmdline', 'rb').read().split(b'\\0')[:5])")
    out = subprocess.run([sys.executable, "-c", code, "x" * 200], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[b'python3', b'-m', b'shim', b'-id', b'pod-1']"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a cgroup")
def test_join_cgroups_of_moves_into_the_starters_cgroup() -> None:
    mounts = spare._cgroup_mounts()
    key = "pids" if "pids" in mounts else ""
    if key not in mounts:
        pytest.skip("no pids (v1) or unified (v2) cgroup hierarchy mounted")
    group = Path(mounts[key]) / f"kata-py-spare-test-{os.getpid()}"
    group.mkdir()
    starter = subprocess.Popen(["sleep", "30"])
    try:
        (group / "cgroup.procs").write_text(str(starter.pid))
        code = ("import sys; from shim import spare; errors = spare.join_cgroups_of(int(sys.argv[1]));"
                "print(errors); print(open('/proc/self/cgroup').read())")
        out = subprocess.run([sys.executable, "-c", code, str(starter.pid)], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        errors, *cgroups = out.splitlines()
        assert errors == "[]"
        line = next(x for x in cgroups if x.count(":") >= 2 and x.split(":")[1] == key)
        assert line.endswith(f"/{group.name}"), out
    finally:
        starter.kill()
        starter.wait()
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 10, "an empty test cgroup")
        group.rmdir()
