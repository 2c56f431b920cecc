"""The leak check watches only what this run started: a process without the run's mark (a live pod's
QEMU, another suite's containerd) is neither reported nor killed; one of ours is reported."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import leaks, owned


def sleeper(env: dict[str, str]) -> subprocess.Popen[bytes]:
    # named like a shim, so the old host-wide check would have taken it for one of ours
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m shim "], env=env)


def test_only_marked_processes_are_the_runs():
    before = leaks.snapshot()
    foreign = sleeper({k: v for k, v in os.environ.items() if k != owned.RUN_MARK})
    ours = sleeper(dict(os.environ))
    try:
        left = leaks.leaked(before, leaks.snapshot())
        assert any(item.startswith(f"processes: {ours.pid}:") for item in left), left
        assert not any(f" {foreign.pid}:" in item for item in left), left
        assert owned.process_is_ours(ours.pid) and not owned.process_is_ours(foreign.pid)
    finally:
        for proc in (foreign, ours):
            proc.kill()
            proc.wait()
    assert leaks.leaked(before, leaks.snapshot()) == []


def listener(path: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
            "print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, path], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


def test_shim_sockets_stale_or_held_by_us_are_ours_a_foreign_listeners_is_not():
    os.makedirs(leaks.SHIM_SOCKETS, exist_ok=True)
    path = f"{leaks.SHIM_SOCKETS}/kp-leak-check-{os.getpid()}"
    foreign_env = {k: v for k, v in os.environ.items() if k != owned.RUN_MARK}
    try:
        for env, expected in ((foreign_env, []), (dict(os.environ), [path])):
            proc = listener(path, env)
            try:
                assert leaks._ours([path]) == expected
            finally:
                proc.kill()
                proc.wait()
                os.unlink(path)
        open(path, "w").close()  # a socket file nobody listens on: a dead shim's, stale
        assert leaks._ours([path]) == [path]
    finally:
        if os.path.exists(path):
            os.unlink(path)
