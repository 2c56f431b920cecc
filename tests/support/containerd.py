"""A private containerd 1.6 in a temp dir (own root, state, sockets, config), started for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shim.mounts import unmount_all

from .images import IMAGE_NAME, build_oci_tar

RUNTIME = "io.containerd.kata-py.v2"
NAMESPACE = "kata-py-test"


class PrivateContainerd:
    def __init__(self, kata_config: str = "", cri: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kpc-", dir="/tmp"))
        self.address = str(self.dir / "c.sock")
        self.bin = self.dir / "bin"
        self.kata_state = self.dir / "kata"
        self.log = self.dir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kata_config = self.dir / "kata-py.toml"
        self.kata_config.write_text(f'[runtime]\nstate_dir = "{self.kata_state}"\ndebug = true\n' + kata_config)
        self._cri = cri

    def _write_config(self) -> Path:
        disabled = [] if self._cri else ['"io.containerd.grpc.v1.cri"']
        cfg = self.dir / "config.toml"
        cfg.write_text(f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
disabled_plugins = [{", ".join(disabled)}]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  level = "debug"
""")
        return cfg

    def _shim_wrapper(self) -> None:
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "containerd-shim-kata-py-v2"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m shim \"$@\"\n")
        wrapper.chmod(0o755)

    def start(self) -> PrivateContainerd:
        self._shim_wrapper()
        cfg = self._write_config()
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               "KATA_PY_CONFIG": str(self.kata_config)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        self.ctr("version")
        return self

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def ctr(self, *args: str, input: bytes | None = None, timeout: float = 180,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = ["ctr", "--address", self.address, "--namespace", NAMESPACE, *args]
        result = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                                stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                                 f"stdout: {result.stdout.decode(errors='replace')}\n"
                                 f"stderr: {result.stderr.decode(errors='replace')}\n"
                                 f"containerd log:\n{self.log_tail()}")
        return result

    def import_busybox(self) -> str:
        tar = build_oci_tar(self.dir / "busybox.tar")
        self.ctr("images", "import", "--no-unpack=false", str(tar))
        return IMAGE_NAME

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stray_processes(self) -> list[int]:
        """Shims (and their QEMUs) started for this containerd that are still alive."""
        marks = (self.address.encode(), str(self.kata_state).encode())
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if any(m in cmd for m in marks) and not cmd.startswith(b"containerd\0"):
                found.append(int(pid))
        return found

    def cleanup(self) -> None:
        self.stop()
        # a failed test may leave a task running; its shim outlives containerd by design, so end it
        # here (the leak check still reports it) rather than leave a VM behind
        for pid in self.stray_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        unmount_all(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
