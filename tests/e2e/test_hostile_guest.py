"""A compromised guest against the real shim sandbox and QEMU (#14).

A container escape inside the guest is always assumed possible, so the attacker here is a guest
process with all of the 9p share: a root container that bind-mounts the agent's own share mount.
It writes what a guest root could write (links to host paths, renames, a file of its own in a
volume, setuid/setgid modes and device nodes on it, a large file) and the test proves that the host never follows any of it, never unmounts or
removes what it did not create, loses no byte of the user's volume (whose path has a non-ASCII
character and a space), and keeps serving the pod.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import trio

from agent_client.protocol import Storage
from shim import mounts
from shim.config import Config, RuntimeConfig
from shim.process import Container, Process
from shim.sandbox import VmSandbox
from shim.share import GUEST_SHARED
from shim.stdio import HostStdio
from tests.e2e.test_sandbox_vm import collect
from vmm.confine import KEPT_CAPS, cap_mask

pytestmark = pytest.mark.vm

APPLETS = ("sh", "echo", "cat", "sleep", "true", "ln", "mkdir", "mv", "touch", "dd", "ls", "rm", "chmod", "mknod")
DATA_MOUNT = 2  # index of the /data mount in the specs below: the share names it mounts/2

ATTACK = """
try() {{ n=$1; shift; if "$@" 2>/dev/null; then echo "$n=ok"; else echo "$n=fail"; fi; }}
S=/share
C=$S/containers/c0
try view-write touch $S/evil
try view-mkdir mkdir $S/containers/c1
try view-symlink ln -s / $S/containers/c1
try view-rename mv $C $S/containers/moved
try view-rm-mountpoint rmdir $C/mounts/{data}
try view-rename-mounts mv $C/mounts $C/elsewhere
try rootfs-link ln -s {canary} $C/rootfs/to-canary
try rootfs-link-mnt ln -s {canary_mnt} $C/rootfs/to-mnt
try rootfs-large dd if=/dev/zero of=$C/rootfs/large bs=1M count=4
try vol-link ln -s / $C/mounts/{data}/to-root
try vol-write sh -c "echo from-guest > $C/mounts/{data}/guest-file"
try vol-chmod-suid chmod 4755 $C/mounts/{data}/guest-file
try vol-chmod-sgid chmod 2755 $C/mounts/{data}/guest-file
try vol-chmod-plain chmod 0640 $C/mounts/{data}/guest-file
try vol-mknod-char mknod $C/mounts/{data}/null c 1 3
try vol-mknod-block mknod $C/mounts/{data}/disk b 254 0
echo done
"""


def make_bundle(root: Path, name: str, args: list[str], volume: Path) -> tuple[Path, dict]:
    bundle = root / name
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "share", "data"):
        (rootfs / d).mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                   {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle, spec


def assert_confined(qemu_pid: int) -> None:
    """QEMU runs with exactly the capabilities vmm/confine.py keeps, no_new_privs and a seccomp filter."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{qemu_pid}/status").read_text().splitlines())
    kept = cap_mask(KEPT_CAPS)
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[field], 16) == kept, (field, status[field])
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # filter mode: ours and QEMU's own -sandbox
    assert "-sandbox" in Path(f"/proc/{qemu_pid}/cmdline").read_bytes().decode(errors="replace")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def host_canaries(tmp_path: Path):
    """A host directory and a host mount that the attacker points links at."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    canary_mnt = tmp_path / "canary-mnt"
    canary_mnt.mkdir()
    mounts.mount("tmpfs", str(canary_mnt), "tmpfs", 0, "size=1m")
    (canary_mnt / "keep").write_text("keep")
    try:
        yield canary, canary_mnt
    finally:
        mounts.umount(canary_mnt)


async def test_compromised_guest_cannot_reach_the_host(tmp_path: Path, host_canaries):
    canary, canary_mnt = host_canaries
    volume = tmp_path / "vol-é x"
    volume.mkdir()
    (volume / "data").write_bytes(os.urandom(1 << 20))
    before = digest(volume / "data")
    state_root = tmp_path / "state"
    config = Config(runtime=RuntimeConfig(state_dir=str(state_root)))
    b0, spec0 = make_bundle(tmp_path, "b0", ["sleep", "600"], volume)
    b1, spec1 = make_bundle(tmp_path, "b1", ["cat", "/data/guest-file"], volume)
    c0 = Container("c0", str(b0), spec0, True, Process("c0", "", HostStdio(False), False))
    c1 = Container("c1", str(b1), spec1, False, Process("c1", "", HostStdio(False), False))
    async with trio.open_nursery() as nursery:
        sandbox = VmSandbox("hostile", config, nursery)
        try:
            with trio.fail_after(240):
                await sandbox.create_container(c0)
                agent = sandbox.agent
                await agent.start_container("c0")
                # the attacker: a guest root with the whole 9p share, on c0's rootfs
                evil = json.loads(json.dumps(spec0))
                evil["process"]["args"] = ["sh", "-c", ATTACK.format(canary=canary, canary_mnt=canary_mnt,
                                                                      data=DATA_MOUNT)]
                evil["mounts"][DATA_MOUNT] = {"destination": "/share", "type": "bind", "source": GUEST_SHARED,
                                              "options": ["rbind"]}
                rootfs = Storage(driver="", source="", mount_point=f"{GUEST_SHARED}/containers/c0/rootfs")
                await agent.create_container("evil", evil, rootfs)
                await agent.start_container("evil")
                out = await collect(agent.read_stdout("evil", ""))
                assert await agent.wait_process("evil", "") == 0
                results = dict(line.split("=", 1) for line in out.decode().split() if "=" in line)
                assert out.endswith(b"done\n"), out
                # the exported directory is read-only: nothing of the host's tree can be shaped
                for attempt in ("view-write", "view-mkdir", "view-symlink", "view-rename", "view-rm-mountpoint",
                                "view-rename-mounts"):
                    assert results[attempt] == "fail", (attempt, out)
                # inside what it may write, it writes (that is the container's own data)
                for attempt in ("rootfs-link", "rootfs-link-mnt", "rootfs-large", "vol-link", "vol-write",
                                "vol-chmod-plain"):
                    assert results[attempt] == "ok", (attempt, out)
                # QEMU cannot make a host file setuid/setgid-executable or a device node for it
                for attempt in ("vol-chmod-suid", "vol-chmod-sgid", "vol-mknod-char", "vol-mknod-block"):
                    assert results[attempt] == "fail", (attempt, out)
                assert_confined(sandbox.pid())
                await agent.remove_container("evil", 30)
                # the pod goes on: a next container through the normal path sees the volume
                await sandbox.create_container(c1)
                await agent.start_container("c1")
                assert await collect(agent.read_stdout("c1", "")) == b"from-guest\n"
                assert await agent.wait_process("c1", "") == 0
                await sandbox.remove_container(c1)
                await sandbox.remove_container(c0)
        finally:
            with trio.CancelScope(shield=True):
                await sandbox.stop()
        nursery.cancel_scope.cancel()
    # every byte of the user's volume, the host paths the guest pointed at, the host's own mount
    assert digest(volume / "data") == before
    assert (volume / "guest-file").read_text() == "from-guest\n"
    assert oct((volume / "guest-file").stat().st_mode & 0o7777) == oct(0o640)
    for path in volume.rglob("*"):
        st = path.lstat()
        assert not st.st_mode & stat.S_ISUID and not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode), path
    assert (volume / "to-root").is_symlink()
    assert (canary / "keep").read_text() == "keep"
    assert mounts.is_mount_point(canary_mnt) and (canary_mnt / "keep").read_text() == "keep"
    assert (b0 / "rootfs" / "to-canary").is_symlink()  # c0's own rootfs keeps what was written in it
    assert not (state_root / "sandboxes" / "hostile").exists()
    assert not mounts.mount_points_under(state_root)
