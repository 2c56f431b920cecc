"""Kubernetes emptyDir volumes backed inside the guest instead of shared from the host (Kata's
"ephemeral" and "local" storages).

kubelet hands an emptyDir to the runtime as a bind mount of
`<kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`. When that directory is a tmpfs
(medium: Memory) the guest gets an `ephemeral` storage, a tmpfs of the same size, mode and owner; on
disk it gets a `local` one, a directory of the guest's own. Either way there is one per pod (the agent
counts the containers using it and removes it with the last) and nothing of the host directory is
visible in the guest. Classification is pure (`storage_for`); `probe` reads the host.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from agent_client.protocol import Storage

EMPTY_DIR_PLUGIN = "kubernetes.io~empty-dir"
GUEST_POD_VOLUMES = "/run/kata-py/sandbox"  # the agent's <root>/sandbox: <driver>/<volume name> below it


@dataclass(frozen=True)
class HostDir:
    """What the host says about an emptyDir's directory."""

    tmpfs: bool  # a tmpfs mounted right there (medium: Memory)
    size_bytes: int = 0  # the tmpfs's size (0: no limit)
    mode: int = 0o777
    uid: int = 0
    gid: int = 0  # a pod's fsGroup shows here


def is_empty_dir(source: str) -> bool:
    """True for a path shaped like kubelet's emptyDir directories (Kata's isEmptyDir)."""
    parts = os.path.normpath(source).split("/")
    return len(parts) >= 3 and parts[-2] == EMPTY_DIR_PLUGIN and parts[-1] not in ("", ".", "..")


def storage_for(source: str, host: HostDir) -> Storage:
    """The guest storage that stands in for the emptyDir at `source`."""
    name = os.path.basename(os.path.normpath(source))
    owner = [f"mode={host.mode & 0o7777:o}", f"uid={host.uid}", f"gid={host.gid}"]
    if host.tmpfs:
        return Storage(driver="ephemeral", source="tmpfs", fstype="tmpfs",
                       mount_point=f"{GUEST_POD_VOLUMES}/ephemeral/{name}",
                       options=(f"size={host.size_bytes}", *owner))
    return Storage(driver="local", source="local", fstype="local",
                   mount_point=f"{GUEST_POD_VOLUMES}/local/{name}", options=tuple(owner))


def probe(source: str, mountinfo: str = "/proc/self/mountinfo") -> HostDir:
    """Stat the emptyDir's directory and find whether a tmpfs is mounted exactly there. Raises OSError."""
    path = os.path.realpath(source)
    st = os.stat(path)
    fstype = ""
    with open(mountinfo) as f:
        for line in f:  # the last mount on a path is the one on top
            fields = line.split()
            if _unescape(fields[4]) == path:
                fstype = fields[fields.index("-") + 1]
    size = 0
    if fstype == "tmpfs":
        vfs = os.statvfs(path)
        size = vfs.f_blocks * vfs.f_frsize
    return HostDir(tmpfs=fstype == "tmpfs", size_bytes=size, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
