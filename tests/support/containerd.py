"""A private containerd in a temp dir (own root, state, sockets, config), started for real.

Any release of tests/support/containerd_releases.py: the host's 1.6, or a private 1.7 or 2.x. Each
gets the configuration format its release reads (1.x `version = 2`; 2.x `version = 3`, where the
CRI plugin's settings live in `io.containerd.cri.v1.runtime` / `io.containerd.cri.v1.images`) and
its own `ctr`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shim.mounts import unmount_all

from . import owned
from .containerd_releases import HOST, RELEASES, Release, bin_dir
from .images import IMAGE_NAME, PAUSE_CMD, PAUSE_IMAGE_NAME, build_oci_tar

RUNTIME = "io.containerd.kata-py.v2"
NAMESPACE = "kata-py-test"
CRI_NAMESPACE = "k8s.io"  # where containerd's CRI plugin keeps its images and containers
RUNTIME_HANDLER = "kata-py"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# the core e2e tests run against every release (the `containerd_release` fixture of tests/conftest.py);
# the rest of the suite runs on the host's 1.6 only
EVERY_RELEASE = pytest.mark.parametrize(
    "containerd_release", [pytest.param(r, id=f"containerd-{r.name}") for r in RELEASES.values()], indirect=True)


def namespace_cgroups() -> set[Path]:
    """The cgroups of our containerd namespaces, in every hierarchy: a container's cgroupsPath is
    /<namespace>/<id>, and neither runc nor the shim removes the namespace level after its child."""
    found: set[Path] = set()
    for ns in (NAMESPACE, CRI_NAMESPACE):
        found |= {p for p in (*CGROUP_ROOT.glob(ns), *CGROUP_ROOT.glob(f"*/{ns}")) if p.is_dir()}
    return found


def cri_section(major: int, *, pause_image: str, kata_config: Path, pod_annotations: tuple[str, ...],
                cni_conf_dir: Path) -> str:
    """The CRI plugin's settings: our pause image, runtime handler kata-py (as packaging/containerd),
    in the layout of containerd `major` (checked against each release's `containerd config default`).
    Pod netns are mounted under the private state dir, not the host's /run/netns: the run's own."""
    patterns = ", ".join(f'"{p}"' for p in pod_annotations)
    if major >= 2:
        runtime, images = 'plugins."io.containerd.cri.v1.runtime"', 'plugins."io.containerd.cri.v1.images"'
        head = f"""[{images}]
  snapshotter = "overlayfs"
[{images}.pinned_images]
  sandbox = "{pause_image}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[{runtime}]
  disable_apparmor = true
  netns_mounts_under_state_dir = true
[{runtime}.containerd]
  default_runtime_name = "runc"
"""
        cni = f"""[{runtime}.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "{cni_conf_dir}"
"""
    else:
        runtime = 'plugins."io.containerd.grpc.v1.cri"'
        head = f"""[{runtime}]
  sandbox_image = "{pause_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  netns_mounts_under_state_dir = true
[{runtime}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
"""
        cni = f"""[{runtime}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni_conf_dir}"
"""
    runtimes = f"{runtime}.containerd.runtimes"
    return head + f"""[{runtimes}.runc]
  runtime_type = "io.containerd.runc.v2"
[{runtimes}.{RUNTIME_HANDLER}]
  runtime_type = "{RUNTIME}"
  privileged_without_host_devices = true
  pod_annotations = [{patterns}]
[{runtimes}.{RUNTIME_HANDLER}.options]
  ConfigPath = "{kata_config}"
""" + cni


def containerd_config(major: int, *, top: Path, address: str, cri: str | None) -> str:
    """A whole config.toml for containerd `major`, everything under `top`; `cri` is cri_section()'s
    text, or None to disable the CRI plugin."""
    disabled = [] if cri is not None else ['"io.containerd.grpc.v1.cri"']
    if major >= 2:
        # on by default in 2.x: it would listen on the host-wide /var/run/nri/nri.sock
        disabled.append('"io.containerd.nri.v1.nri"')
    return f"""version = {3 if major >= 2 else 2}
root = "{top}/root"
state = "{top}/state"
disabled_plugins = [{", ".join(disabled)}]
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{top}/opt"
""" + (cri or "")


class PrivateContainerd:
    _instances = 0

    def __init__(self, kata_config: str = "", cri: bool = False,
                 pod_annotations: tuple[str, ...] = ("io.katacontainers.*",), release: Release = HOST) -> None:
        self.release = release
        self.release_bin = bin_dir(release)  # fetched (once per machine) before any temp dir is made
        self.dir = Path(tempfile.mkdtemp(prefix="kpc-", dir="/tmp"))
        self.address = str(self.dir / "c.sock")
        self.bin = self.dir / "bin"
        self.kata_state = self.dir / "k"  # short: CRI sandbox ids are 64 chars and AF_UNIX paths max 107
        self.log = self.dir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kata_config = self.dir / "kata-py.toml"
        ours = f'state_dir = "{self.kata_state}"\ndebug = true'
        if re.search(r"^\[runtime\]\s*$", kata_config, re.M):  # one [runtime] table: ours go into the caller's
            text = re.sub(r"^\[runtime\]\s*$", lambda _: f"[runtime]\n{ours}", kata_config, count=1, flags=re.M)
        else:
            text = f"[runtime]\n{ours}\n{kata_config}"
        self.kata_config.write_text(text)
        self._cri = cri
        self._cgroups_before = namespace_cgroups()  # cleanup() removes only the ones made since
        self._pod_annotations = pod_annotations
        self.cni_conf_dir = self.dir / "cni" / "net.d"
        # CRI pods get their own network namespace (kata-py refuses host-network pods), wired by
        # Debian's bridge + host-local plugins to a bridge of this instance's (removed by cleanup)
        PrivateContainerd._instances += 1
        self.cni_bridge = owned.test_name("kpd")
        self._cni_subnet = f"10.{96 + PrivateContainerd._instances // 250 % 4}.{PrivateContainerd._instances % 250}.0/24"

    @property
    def ctr_binary(self) -> str:
        """This release's ctr (1.7's and 2.x's come in the containerd package)."""
        return str(self.release_bin / "ctr")

    def ctr_argv(self, namespace: str = NAMESPACE) -> list[str]:
        return [self.ctr_binary, "--address", self.address, "--namespace", namespace]

    @property
    def cri_address(self) -> str:
        """gRPC target of the CRI services (same socket as containerd's API)."""
        return f"unix://{self.address}"

    def _write_config(self) -> Path:
        cri = None
        if self._cri:
            self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
            # last in name order: a test's own conflist (10-...) comes first and wins
            (self.cni_conf_dir / "90-kp-default.conflist").write_text(json.dumps({
                "cniVersion": "0.4.0", "name": "kp-default", "plugins": [{
                    "type": "bridge", "bridge": self.cni_bridge, "isGateway": True, "ipMasq": False,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": self._cni_subnet}]],
                             "dataDir": str(self.dir / "cni" / "ipam")}}]}))
            cri = cri_section(self.release.major, pause_image=PAUSE_IMAGE_NAME, kata_config=self.kata_config,
                              pod_annotations=self._pod_annotations, cni_conf_dir=self.cni_conf_dir)
        cfg = self.dir / "config.toml"
        cfg.write_text(containerd_config(self.release.major, top=self.dir, address=self.address, cri=cri))
        return cfg

    def _shim_wrapper(self) -> None:
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "containerd-shim-kata-py-v2"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m shim \"$@\"\n")
        wrapper.chmod(0o755)

    def start(self) -> PrivateContainerd:
        self._shim_wrapper()
        cfg = self._write_config()
        # our shim wrapper first, then the release's own runc shim, then the rest
        path = ":".join((str(self.bin), str(self.release_bin), os.environ.get("PATH", "/usr/bin:/bin")))
        env = {**os.environ, "PATH": path, "KATA_PY_CONFIG": str(self.kata_config)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(self.release_bin / "containerd"), "--config", str(cfg)], stdout=log, stderr=log,
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

    def ctr(self, *args: str, input: bytes | None = None, timeout: float = 180, check: bool = True,
            namespace: str = NAMESPACE) -> subprocess.CompletedProcess[bytes]:
        cmd = [*self.ctr_argv(namespace), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                                stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                                 f"stdout: {result.stdout.decode(errors='replace')}\n"
                                 f"stderr: {result.stderr.decode(errors='replace')}\n"
                                 f"containerd log:\n{self.log_tail()}")
        return result

    def import_busybox(self, namespace: str = NAMESPACE) -> str:
        tar = build_oci_tar(self.dir / "busybox.tar")
        self.ctr("images", "import", "--no-unpack=false", str(tar), namespace=namespace)
        return IMAGE_NAME

    def import_cri_images(self) -> tuple[str, str]:
        """Busybox and the pause image into the CRI plugin's namespace; returns (busybox, pause)."""
        pause = build_oci_tar(self.dir / "pause.tar", PAUSE_IMAGE_NAME, PAUSE_CMD)
        self.ctr("images", "import", "--no-unpack=false", str(pause), namespace=CRI_NAMESPACE)
        return self.import_busybox(CRI_NAMESPACE), PAUSE_IMAGE_NAME

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
            if any(m in cmd for m in marks) and os.path.basename(cmd.split(b"\0", 1)[0]) != b"containerd":
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
        if self._cri:
            subprocess.run(["ip", "link", "delete", self.cni_bridge], check=False, capture_output=True)
        for group in namespace_cgroups() - self._cgroups_before:  # ours, and nothing left in them
            if not any(child.is_dir() for child in group.iterdir()):
                try:
                    group.rmdir()
                except OSError:
                    pass  # still busy: the leak check names it
