"""Fixtures for the agent component tests: a real agent process on the host, driven over gRPC.

The agent runs in a private mount namespace with cgroup2 mounted at /sys/fs/cgroup, as in the guest
(this host mounts cgroup v1 there); everything it mounts dies with that namespace. runc/crun keep their
state under the agent's temporary root, never in the host's default state directories.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.agent.v1 import agent_pb2 as pb
from protos.agent.v1 import agent_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = "/bin/busybox"
AGENT_START_TIMEOUT = 20.0
RPC_TIMEOUT = 20.0
_APPLETS = ("sh", "echo", "cat", "sleep", "true", "ls", "ps", "kill")
_HOST_CGROUP2 = "/sys/fs/cgroup/unified"  # where this (hybrid) host shows the cgroup2 hierarchy

# Run the agent with cgroup2 at /sys/fs/cgroup in a throw-away mount namespace.
_IN_CGROUP2_NS = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"', "sh"]


def _require_root_and_runc() -> None:
    if os.geteuid() != 0:
        pytest.skip("agent component tests need root (runc, mounts)")
    for tool in ("runc", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")


def agent_build_rootfs(path: Path) -> None:
    """A minimal busybox root filesystem at `path`."""
    (path / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        (path / d).mkdir()
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    for name in _APPLETS:
        os.symlink("busybox", path / "bin" / name)


def agent_oci_spec(args: list[str], terminal: bool = False) -> dict[str, Any]:
    """A minimal runtime spec, like `runc spec` trimmed to what busybox needs. root.path and
    cgroupsPath are placeholders the agent must replace."""
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
                    "capabilities": {k: ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"]
                                     for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": "/host/path/that/does/not/exist", "readonly": True},
        "hostname": "agent-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "hooks": {"prestart": [{"path": "/host/bin/hook-that-must-not-run"}]},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network", "path": "/proc/1/ns/net"}],
            "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:host-id",
        },
    }


class AgentProcess:
    """A running agent: its process, root, runtime and a stub."""

    def __init__(self, tmp: Path, runtime: str) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.sock = tmp / "a.sock"
        self.runtime = runtime
        self.proc = subprocess.Popen(
            [*_IN_CGROUP2_NS, sys.executable, "-m", "agent", "--listen", f"unix:{self.sock}",
             "--root", str(self.root), "--runtime", runtime],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        self.stdout_lines = self._wait_ready()
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.stub = pb_grpc.AgentStub(self.channel)

    def _wait_ready(self) -> list[str]:
        assert self.proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                lines = buf.decode().splitlines()
                if "KATA_PY_AGENT_READY" in lines:
                    return lines
        self.kill()
        raise RuntimeError(f"agent did not become ready: stdout={buf!r} stderr={self.proc.stderr.read()!r}")

    def runtime_list(self) -> list[str]:
        """Container ids the runtime still knows under the agent's state root."""
        out = subprocess.run([self.runtime, "--root", str(self.root / "runtime"), "list", "-q"],
                             capture_output=True, text=True, check=True).stdout
        return out.split()

    def stop(self) -> int:
        """SIGTERM the agent and wait for it; returns its exit code."""
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stderr(self) -> str:
        """Everything the agent logged (after it has exited)."""
        assert self.proc.stderr is not None and self.proc.poll() is not None
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def _runtime_works(runtime: str, tmp: Path) -> str:
    """'' if `runtime` can run a container here (in the cgroup2 namespace), else the reason."""
    if shutil.which(runtime) is None:
        return f"{runtime} is not installed"
    bundle = tmp / f"probe-{runtime}"
    agent_build_rootfs(bundle / "rootfs")
    spec = agent_oci_spec(["true"])
    spec["root"]["path"] = "rootfs"
    spec["linux"]["namespaces"] = spec["linux"]["namespaces"][:4]
    spec["linux"]["cgroupsPath"] = f"/kata-py-probe-{os.getpid()}"
    del spec["hooks"]
    (bundle / "config.json").write_text(json.dumps(spec))
    state = tmp / f"probe-{runtime}-state"
    r = subprocess.run([*_IN_CGROUP2_NS, runtime, "--root", str(state), "run", "--bundle", str(bundle),
                        "probe"], capture_output=True, text=True, timeout=30)
    subprocess.run([*_IN_CGROUP2_NS, runtime, "--root", str(state), "delete", "-f", "probe"],
                   capture_output=True, timeout=30)
    if r.returncode != 0:
        return f"{runtime} cannot run containers on this host: {(r.stderr or r.stdout).strip()}"
    return ""


@pytest.fixture(scope="session")
def agent_runtime_problems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    _require_root_and_runc()
    tmp = tmp_path_factory.mktemp("runtime-probe")
    try:
        return {rt: _runtime_works(rt, tmp) for rt in ("runc", "crun")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module", params=["runc", "crun"])
def agent(request: pytest.FixtureRequest, agent_runtime_problems: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent process per module and runtime, with a sandbox holding a busybox image at
    <root>/images/busybox. Teardown checks it exits on SIGTERM and leaves nothing behind."""
    runtime: str = request.param
    if agent_runtime_problems[runtime]:
        pytest.skip(agent_runtime_problems[runtime])
    tmp = tmp_path_factory.mktemp(f"agent-{runtime}")
    a = AgentProcess(tmp, runtime)
    try:
        agent_build_rootfs(a.root / "images" / "busybox")
        a.stub.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb", storages=[
            pb.Storage(driver="local", mount_point=str(a.root / "shared")),
            pb.Storage(driver="bind", source=str(a.root / "images"), mount_point=str(a.root / "img"),
                       options=["ro"]),
        ]), timeout=RPC_TIMEOUT)
        yield a
        rc = a.stop()
        stderr = a.stderr()
        assert rc == 0, stderr
        assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
        assert a.runtime_list() == [], "runtime state left behind"
        assert not os.path.exists(os.path.join(_HOST_CGROUP2, "kata-py")), "cgroup left behind"
    finally:
        a.kill()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def agent_containers(agent: AgentProcess) -> Iterator[Callable[..., str]]:
    """Factory: create(cid, args, terminal=False, stdin=False, start=True) -> cid, with the busybox
    image as rootfs. Every container made is removed at teardown, even if the test failed."""
    made: list[str] = []

    def create(cid: str, args: list[str], terminal: bool = False, stdin: bool = False,
               start: bool = True) -> str:
        made.append(cid)
        agent.stub.CreateContainer(pb.CreateContainerRequest(
            container_id=cid, oci_spec_json=json.dumps(agent_oci_spec(args, terminal)).encode(),
            rootfs=pb.Storage(driver="bind", source=str(agent.root / "img" / "busybox"),
                              mount_point=str(agent.root / "containers-rootfs" / cid)),
            terminal=terminal, stdin=stdin), timeout=RPC_TIMEOUT)
        if start:
            agent.stub.StartContainer(pb.ContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
        return cid

    yield create
    for cid in made:
        try:
            agent.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=cid, timeout_seconds=10),
                                       timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
