"""Warming the guest up, so that a template's clones answer fast.

Before READY (and so before a template is saved): what then lands in the page cache and in lazily
built state stays in every clone. After a restore: a clone's QEMU starts with no TCG translations,
so a clone that waits unused (in the pool) runs the paths a pod's first requests take.
"""

import glob
import logging
import os
import shutil
import threading
import time
from typing import Any

import grpc

from agent import mounts, network
from agent.containers import Containers
from agent.oci_runtime import OciRuntime
from agent.reaper import Reaper
from agent.server import reaped_run
from agent.storage import NINEP_MOUNT_LOCK
from protos.agent.v1 import agent_pb2, agent_pb2_grpc

CLONE_WARM_UP_DELAY_S = 2.0  # guest time after READY; the template is saved ~0.4 s after it
WARM_UP_ID = "kata-py-warm-up"
NINEP_TAGS = "/sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag"


def warm_up_spec() -> dict[str, Any]:
    """A container like the ones containerd's default spec makes (own pid/ipc/uts/mount namespaces;
    proc, dev, devpts, shm, mqueue, sysfs; masked and read-only paths; capabilities; a cgroup)
    running the guest's own `true`, its /usr bound read-only into a tmpfs root."""
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
            "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["/usr/bin/true"], "env": ["PATH=/usr/bin"],
                    "cwd": "/", "noNewPrivileges": True,
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]},
        "root": {"path": "", "readonly": False},
        "hostname": WARM_UP_ID,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                  "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                  "readonlyPaths": ["/proc/bus", "/proc/sys", "/proc/sysrq-trigger"]},
    }


def warm_up_rootfs(root: str) -> str:
    """An empty root in the agent's tmpfs with merged-/usr links (the binaries come by bind mount)."""
    rootfs = os.path.join(root, "warm-up-rootfs")
    os.makedirs(rootfs, exist_ok=True)
    for name in ("bin", "lib", "lib64"):
        link = os.path.join(rootfs, name)
        if not os.path.lexists(link):
            os.symlink(f"usr/{name}", link)
    return rootfs


class WarmUp:
    """The agent's warm-ups; `before_ready()` runs once before READY, `clones()` arms the other."""

    def __init__(self, root: str, address: str, runtime: OciRuntime, containers: Containers,
                 reaper: Reaper) -> None:
        self.root = root
        self.address = address
        self.runtime = runtime
        self.containers = containers
        self.reaper = reaper

    def before_ready(self) -> None:
        """Before the agent says it is ready (and a template is saved), go once through what a
        clone's first requests need. The OCI runtime's binary and libraries enter the guest's page
        cache, which the template captures: a clone's first crun create 0.68 → 0.40 s, start
        0.32 → 0.19 s under TCG (a whole throwaway container gained nothing more). One health check
        over the local socket makes the server's first-call set-up (worker threads, lazy state)
        part of the template too: the host's first Check after a restore ~0.5 → ~0.3 s."""
        log = logging.getLogger("agent")
        try:
            log.debug("warm-up: %s", self.runtime.version().splitlines()[0])
        except Exception as e:  # noqa: BLE001 - only an optimisation: a real create will say what is wrong
            log.warning("warm-up: %s --version failed: %s", self.runtime.name, e)
        try:
            with grpc.insecure_channel(self.address) as channel:
                agent_pb2_grpc.AgentStub(channel).Check(agent_pb2.CheckRequest(), timeout=10)
        except Exception as e:  # noqa: BLE001 - as above
            log.warning("warm-up: health check: %s", e)

    def clones(self, host_connected: threading.Event) -> None:
        """Have every clone of this guest that waits unused warm itself up once restored.

        A restored QEMU starts with an empty TCG translation cache: every guest code path a clone
        runs for the first time is translated first, which is most of why its first requests are
        slow (first health check ~0.4 s, then ~0.07 s; crun create ~0.6 s, then ~0.3 s). A thread
        armed now, just before the template is saved, wakes CLONE_WARM_UP_DELAY_S of guest time
        later — in each clone, after its restore (guest time stands still in a saved template). If
        the host has not reached the agent by then, the clone is waiting in a pool: at SCHED_IDLE it
        runs a health check, a look at the 9p share, `ip` and a throwaway container, so that it is
        hot when handed out, and stops early when the host comes. A clone in use (template restore,
        cold boot) skips it: it would only cost memory there."""

        def later() -> None:
            time.sleep(CLONE_WARM_UP_DELAY_S)
            if not host_connected.is_set():
                self.clone(until=host_connected)

        threading.Thread(target=later, name="clone-warm-up", daemon=True).start()

    def clone(self, until: threading.Event | None = None) -> int | None:
        """The warm-up itself; returns the throwaway container's exit status, None if it failed
        (logged) or was left out because `until` was set meanwhile (the host came: the pod's own
        requests are better served without it)."""
        log = logging.getLogger("agent")
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread and its children
        except OSError as e:
            log.debug("clone warm-up: SCHED_IDLE: %s", e)
        t0 = time.monotonic()
        stop = until or threading.Event()
        self.before_ready()
        if not stop.is_set():
            self._ninep(log)
        if not stop.is_set():
            try:  # what the pod's network set-up runs first (UpdateInterface, UpdateRoutes)
                ip = network.Ip(reaped_run(self.reaper))
                ip.json("addr", "show")
                ip.json("route", "show")
            except Exception as e:  # noqa: BLE001 - only an optimisation
                log.debug("clone warm-up: ip: %s", e)
        if stop.is_set():
            log.debug("timing clone_warm_up=%.3f cut short: the host came", time.monotonic() - t0)
            return None
        status = None
        try:
            rootfs = warm_up_rootfs(self.root)
            self.containers.create(WARM_UP_ID, warm_up_spec(), rootfs, terminal=False, want_stdin=False,
                                   storages=[])
            try:
                self.containers.start(WARM_UP_ID)
                status = self.containers.wait(WARM_UP_ID, "")
            finally:
                self.containers.remove(WARM_UP_ID, 10.0)
        except Exception as e:  # noqa: BLE001 - only an optimisation
            log.warning("clone warm-up: container: %s", e)
        finally:
            shutil.rmtree(os.path.join(self.root, "warm-up-rootfs"), ignore_errors=True)
        log.debug("timing clone_warm_up=%.3f status=%s", time.monotonic() - t0, status)
        return status

    def _ninep(self, log: logging.Logger) -> None:
        """Mount each virtio-9p share read-only for a moment and list it: the pod's CreateSandbox
        mounts one and its containers' root filesystems come over it. (The pool VM's share is its
        own empty directory on the host.)"""
        for tag_file in glob.glob(NINEP_TAGS):
            target = os.path.join(self.root, "warm-up-9p")
            try:
                with open(tag_file) as f:
                    tag = f.read().strip("\0\n ")
                os.makedirs(target, exist_ok=True)
                with NINEP_MOUNT_LOCK:  # held until unmounted: the pod's own mount of it waits
                    mounts.mount(tag, target, "9p", mounts.MS_RDONLY, "trans=virtio,version=9p2000.L")
                    try:
                        os.listdir(target)
                    finally:
                        mounts.umount(target)
            except OSError as e:
                log.debug("clone warm-up: 9p %s: %s", tag_file, e)
            finally:
                try:
                    os.rmdir(target)
                except OSError:
                    pass
