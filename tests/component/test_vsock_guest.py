"""The guest half of the vsock gate, in a real guest: the agent finds its token where QEMU's -fw_cfg put
it (module qemu_fw_cfg in the initrd) and listens; without one it refuses to serve at all.

Where /dev/vhost-vsock exists, the VM gets its vhost-vsock device; here (none) the device is left out
and the guest's listener binds without a transport, which is as far as this host can go: the
connection itself is tested over a stand-in (test_vsock_channel.py). Slow under TCG: marked `vm`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_client.transport import vsock_available
from vmm.accel import detect_accel
from vmm.cmdline import build_argv
from vmm.config import VmConfig, VsockChannel
from vmm.vsock import guest_cid, new_token, write_token

GUEST = Path(os.environ.get("KATA_PY_GUEST_DIR", "/var/cache/kata-py/guest/current"))
BOOT_TIMEOUT = 120.0

def _has_fw_cfg_module() -> bool:
    try:
        return any("qemu_fw_cfg" in m for m in json.loads((GUEST / "manifest.json").read_text())["modules"])
    except (OSError, ValueError, KeyError):
        return False


pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]
needs_guest = pytest.mark.skipif(
    not _has_fw_cfg_module(), reason=f"no guest image in {GUEST}, or one that predates qemu_fw_cfg: "
                                     "(re)build it with packaging/guest/build_guest.py")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kp-vsock-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _argv(cfg: VmConfig, *, with_token: bool) -> list[str]:
    argv = build_argv(cfg, detect_accel("auto"))
    drop = set()
    for i, a in enumerate(argv):
        if (a == "-device" and argv[i + 1].startswith("vhost-vsock") and not vsock_available()) or \
           (a == "-fw_cfg" and not with_token):
            drop |= {i, i + 1}
    return [a for i, a in enumerate(argv) if i not in drop]


def _boot_until(cfg: VmConfig, argv: list[str], markers: tuple[str, ...]) -> tuple[str, str, bool]:
    """Run QEMU until the console shows one of `markers` or QEMU exits; return (the marker or "",
    the console, whether QEMU exited by itself). QEMU is always gone afterwards."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            console = cfg.console_path.read_text(errors="replace") if cfg.console_path.exists() else ""
            found = next((m for m in markers if m in console), "")
            if found or proc.poll() is not None:
                time.sleep(0.2 if found else 0)
                return found, cfg.console_path.read_text(errors="replace"), proc.poll() is not None
            time.sleep(0.1)
        return "", cfg.console_path.read_text(errors="replace"), False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@needs_guest
def test_guest_reads_its_token_through_fw_cfg_and_listens(state_dir: Path) -> None:
    cfg = VmConfig(state_dir=state_dir, kernel=GUEST / "vmlinux", initrd=GUEST / "initrd.img",
                   rootfs=GUEST / "rootfs.erofs", memory_mib=512, max_memory_mib=512,
                   agent=VsockChannel(guest_cid=guest_cid(state_dir.name)))
    token = new_token()
    assert cfg.agent_token_file is not None
    write_token(cfg.agent_token_file, token)
    argv = _argv(cfg, with_token=True)
    assert token.decode() not in " ".join(argv)  # only the file's path is on the command line
    found, console, _ = _boot_until(cfg, argv, ("KATA_PY_AGENT_READY", "KATA_PY_AGENT_CHANNEL_ERROR",
                                                "Traceback", "Kernel panic"))
    assert found == "KATA_PY_AGENT_READY", console[-3000:]
    assert "KATA_PY_AGENT_VSOCK port=1024 token=fw_cfg" in console
    assert token.decode() not in console


@needs_guest
def test_guest_without_a_token_refuses_to_serve(state_dir: Path) -> None:
    cfg = VmConfig(state_dir=state_dir, kernel=GUEST / "vmlinux", initrd=GUEST / "initrd.img",
                   rootfs=GUEST / "rootfs.erofs", memory_mib=512, max_memory_mib=512,
                   agent=VsockChannel(guest_cid=guest_cid(state_dir.name)))
    found, console, exited = _boot_until(cfg, _argv(cfg, with_token=False), ("KATA_PY_AGENT_READY",))
    assert found == ""
    assert "no agent token at /sys/firmware/qemu_fw_cfg/by_name/opt/io.kata-py/agent-token/raw" in console, \
        console[-3000:]
    assert exited  # PID 1 gave up: the kernel panicked, and QEMU (-no-reboot) exited


def test_qemu_refuses_to_start_without_the_token_file(state_dir: Path) -> None:
    # the host half fails closed too: no file, no VM (never a VM whose agent has no token)
    cfg = VmConfig(state_dir=state_dir, agent=VsockChannel(guest_cid=guest_cid(state_dir.name)),
                   start_paused=True)
    argv = _argv(cfg, with_token=True)
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    console = cfg.console_path.read_text() if cfg.console_path.exists() else ""
    assert out.returncode != 0
    assert "can't load" in out.stderr + console and "agent-token" in out.stderr + console
