"""The sandbox VM without containerd: boot, agent, a container from a host bundle, exec, teardown (#4)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from shim.config import Config, RuntimeConfig
from shim.errors import ShimError
from shim.process import Container, Process
from shim.sandbox import VmSandbox
from shim.stdio import HostStdio

pytestmark = pytest.mark.vm

APPLETS = ("sh", "echo", "cat", "sleep", "true", "uname", "nproc")


def make_bundle(root: Path, args: list[str]) -> Path:
    bundle = root / "bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


async def collect(stream) -> bytes:
    out = b""
    async with aclosing(stream) as chunks:
        async for chunk in chunks:
            out += chunk
    return out


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    yield root
    assert not (root / "sandboxes").exists() or not any((root / "sandboxes").iterdir()), "sandbox state left"


async def test_boot_run_exec_and_destroy(tmp_path: Path, state_root: Path):
    bundle = make_bundle(tmp_path, ["sh", "-c", "echo hello-from-guest; uname -r; sleep 1; exit 5"])
    config = Config(runtime=RuntimeConfig(state_dir=str(state_root)))
    async with trio.open_nursery() as nursery:
        sandbox = VmSandbox("sbx1", config, nursery)
        spec = json.loads((bundle / "config.json").read_text())
        container = Container("c1", str(bundle), spec, True, Process("c1", "", HostStdio(False), False))
        try:
            with trio.fail_after(180):
                await sandbox.create_container(container)
            qemu_pid = sandbox.pid()
            assert qemu_pid != os.getpid() and os.path.exists(f"/proc/{qemu_pid}")
            agent = sandbox.agent
            await agent.start_container("c1")
            async with trio.open_nursery() as readers:
                outputs: dict[str, bytes] = {}

                async def read(name: str, stream) -> None:
                    outputs[name] = await collect(stream)

                readers.start_soon(read, "stdout", agent.read_stdout("c1", ""))
                # an exec while the container runs
                await trio.sleep(0.2)
                await agent.exec_process("c1", "e1", {"args": ["sh", "-c", "echo exec-ok"], "cwd": "/",
                                                      "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
                readers.start_soon(read, "exec", agent.read_stdout("c1", "e1"))
                assert await agent.wait_process("c1", "e1") == 0
                status = await agent.wait_process("c1", "")
            assert status == 5
            assert outputs["stdout"].startswith(b"hello-from-guest\n")
            assert b"6.1" in outputs["stdout"]  # the guest kernel, not the host's
            assert outputs["exec"] == b"exec-ok\n"
            await sandbox.remove_container(container)
        finally:
            with trio.CancelScope(shield=True):
                await sandbox.stop()
        assert not os.path.exists(f"/proc/{qemu_pid}"), "QEMU outlived stop()"
        nursery.cancel_scope.cancel()


async def test_qemu_killed_mid_run_is_reported_not_a_hang(tmp_path: Path, state_root: Path):
    bundle = make_bundle(tmp_path, ["sleep", "600"])
    config = Config(runtime=RuntimeConfig(state_dir=str(state_root)))
    async with trio.open_nursery() as nursery:
        sandbox = VmSandbox("sbx2", config, nursery)
        spec = json.loads((bundle / "config.json").read_text())
        container = Container("c2", str(bundle), spec, True, Process("c2", "", HostStdio(False), False))
        try:
            with trio.fail_after(180):
                await sandbox.create_container(container)
            await sandbox.agent.start_container("c2")
            os.kill(sandbox.pid(), signal.SIGKILL)
            with trio.fail_after(20):  # the blocked wait fails promptly, it does not hang
                with pytest.raises(Exception) as failure:
                    await sandbox.agent.wait_process("c2", "")
            assert "Unavailable" in type(failure.value).__name__ or "closed" in str(failure.value).lower() \
                or isinstance(failure.value, ShimError), repr(failure.value)
            with trio.fail_after(10):  # and the watcher reports the VM's death
                await sandbox.vm_exited.wait()
            assert not sandbox.vm_exit.expected, sandbox.vm_exit
        finally:
            with trio.CancelScope(shield=True):
                await sandbox.stop()
        nursery.cancel_scope.cancel()
