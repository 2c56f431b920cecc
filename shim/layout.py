"""Every path and socket name the shim's processes agree on, in one place (docs/architecture.md,
"Host state layout").

`start`, the daemon, `delete`, the pool and its spares are separate processes that share no state
but these names: each derives them here from what it is given (containerd's address, the ids, the
runtime's state dir), so they agree without talking. Pure (no I/O), stdlib and shim.oci only: the
binary layer, the runtime and the tools all import it, and it imports none of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import oci

# --- the shim's ttrpc socket, as containerd's own shims name theirs -------------------------------
SOCKET_DIR = "/run/containerd/s"  # 0700; the socket in it is 0600
SOCKET_DIR_ENV = "KATA_PY_SOCKET_DIR"  # overrides SOCKET_DIR for the flag's default (tests)

# --- in the bundle --------------------------------------------------------------------------------
ADDRESS_FILE = "address"  # the pod shim's address, written by `start` (containerd reads it)
ADDRESS_TMP_FILE = ".address"  # written first, then renamed: never half a name
SOCKET_DIR_FILE = "kata-py.socket-dir"  # where `start` put the socket, for `delete`
LOG_FIFO = "log"  # containerd reads the daemon's log from it

# --- under the runtime's state dir (config runtime.state_dir) -------------------------------------
SANDBOXES_DIR = "sandboxes"  # <state>/sandboxes/<name>/: one per pod (sandbox_state_dir)
POOL_DIR = "pool"  # <state>/pool/: the `kata-py pool` service's default home
POOL_SOCKET = "pool.sock"  # <state>/pool/pool.sock unless [factory] pool_socket names another
POOL_VMS_DIR = "vms"  # <state>/pool/vms/<pool pid>/<n>/: a pool's VMs, renamed into sandboxes/ at hand-out
SPARES_DIR = "spares"  # next to the pool's socket: one socket per spare shim
BUILDS_DIR = "tb"  # <state>/tb/<pid of the builder>/<key prefix>: template build VMs (short: socket paths)
STATE_ID_MAX = 24  # longer sandbox ids are shortened (sandbox_state_dir)


def socket_address(containerd_address: str, namespace: str, grouping: str, socket_dir: str = SOCKET_DIR) -> str:
    """unix:// path the way containerd's shims derive it: sha256 of <address>/<ns>/<id>."""
    joined = os.path.normpath(os.path.join(containerd_address, namespace, grouping))
    return f"unix://{socket_dir}/{hashlib.sha256(joined.encode()).hexdigest()}"


def socket_path(address: str) -> str:
    return address.removeprefix("unix://")


def sandboxes_dir(state_root: str | Path) -> Path:
    return Path(state_root) / SANDBOXES_DIR


def sandbox_state_dir(state_root: str | Path, sandbox_id: str) -> Path:
    """Where a sandbox keeps its sockets and shared dir.

    CRI ids are 64 hex digits: naming the directory after the whole id would push
    <dir>/agent.sock past the 107-byte unix socket limit, so long ids are shortened (by hash, so
    the shim and `delete` agree without sharing state).
    """
    oci.validate_id(sandbox_id, "sandbox id")  # never a path of its own: `..`, `/`, newlines
    name = (sandbox_id if len(sandbox_id) <= STATE_ID_MAX
            else hashlib.sha256(sandbox_id.encode()).hexdigest()[:STATE_ID_MAX])
    return sandboxes_dir(state_root) / name


def default_pool_socket(state_root: str | Path) -> Path:
    return Path(state_root) / POOL_DIR / POOL_SOCKET


def pool_vms_dir(state_root: str | Path) -> Path:
    return Path(state_root) / POOL_DIR / POOL_VMS_DIR


def spares_dir(pool_socket: Path) -> Path:
    return pool_socket.parent / SPARES_DIR


def builds_dir(state_root: str | Path) -> Path:
    return Path(state_root) / BUILDS_DIR
