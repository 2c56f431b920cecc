"""Spare shim daemons: `python -m shim -spare <socket>` imports everything a daemon needs, then waits
to be told which pod to serve.

Why: a new daemon spends 0.4-0.7 s importing trio, grpc, protobuf and qemu.qmp before it serves, and
containerd waits for that on every pod start. `kata-py pool` keeps spares ready ([factory]
pool_shims); the `start` action asks the pool for one and hands it the pod — the daemon's arguments,
the bundle, the environment, and the listening socket by SCM_RIGHTS — instead of starting Python.
Without a pool, or when anything on this path fails, `start` spawns the daemon as before.

Hand-off on the spare's own socket (0600, in the pool's 0700 directory), one connection:
  start -> spare  one JSON line {"argv": [...], "cwd": <bundle>, "env": {...}} with the listening fd
  spare -> start  {"ok": true, "pid": N} or {"ok": false, "reason": "..."}
  start -> spare  "go" — only then does the spare serve. If `start` gave up before (EOF), the spare
                  exits: a listening socket is never served by two daemons.
The spare then moves itself into the cgroups of the `start` process (where a daemon spawned by
`start` would be: containerd's), drops the pool's stdio, and takes the daemon's command line, so
that it looks and is accounted exactly like a daemon `start` spawned. `run_spare` returns the
daemon's arguments: `__main__` runs the daemon with them, as it would have for a spawned one.

This module is imported by `start` (the client side): stdlib only at the top.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

from .args import LISTEN_FD_ENV
from .timing import ASSIGNED_ENV

MAX_MESSAGE = 256 * 1024  # argv + environment; containerd's are a few KiB
PARENT_CHECK_S = 1.0


class HandOffError(Exception):
    """The spare refused or did not answer (the caller spawns a daemon instead)."""


# --- `start`'s side --------------------------------------------------------------------------------
def take_spare(pool_socket: str, timeout: float = 1.0) -> str:
    """Ask the pool for a spare; returns its socket. Raises HandOffError (none ready) or OSError.
    (The pool's JSON-lines protocol, shim/factory/protocol.py, spoken without trio: `start` is a
    short process that must not pay for importing it.)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(pool_socket)
        sock.sendall(b'{"op": "spare"}\n')
        try:
            answer = json.loads(_read_line(sock))
        except ValueError as exc:
            raise HandOffError(f"pool {pool_socket}: malformed reply") from exc
    if not isinstance(answer, dict) or not answer.get("ok") or not isinstance(answer.get("socket"), str):
        reason = answer.get("reason") if isinstance(answer, dict) else answer
        raise HandOffError(f"no spare shim from the pool: {reason}")
    return str(answer["socket"])


def hand_off(spare_socket: str, argv: list[str], cwd: str, env: dict[str, str], listen_fd: int,
             timeout: float = 3.0) -> int:
    """Give the pod to the spare listening on `spare_socket`; return its pid once it took it.
    Raises HandOffError or OSError; then the spare does not serve (it exits)."""
    message = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(spare_socket)
        socket.send_fds(sock, [message], [listen_fd])
        reply = _read_line(sock)
        try:
            answer = json.loads(reply)
        except ValueError as exc:
            raise HandOffError(f"spare {spare_socket}: malformed reply") from exc
        if not isinstance(answer, dict) or not answer.get("ok") or not isinstance(answer.get("pid"), int):
            reason = answer.get("reason") if isinstance(answer, dict) else answer
            raise HandOffError(f"spare {spare_socket} refused: {reason}")
        sock.sendall(b"go\n")
        return int(answer["pid"])


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise HandOffError("connection closed before the reply")
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            raise HandOffError("reply too long")
    return buf


# --- the spare's side ------------------------------------------------------------------------------
def preload() -> None:
    """Import what a daemon imports, and what its sandbox imports later (the pod network's netlink
    code, ~0.2 s, is imported lazily by a daemon that `start` spawned)."""
    from . import daemon  # noqa: F401
    from .network import follow, netns, pod  # noqa: F401


def run_spare(socket_path: str) -> list[str] | None:
    """Wait for one pod and become its daemon: returns the daemon's arguments (this process now has
    its environment, cgroups, stdio and command line). None when the pool that started us is gone,
    or after a hand-off that failed (the spare then exits 0): the pool gave us away already, and a
    spare only ever takes one connection."""
    preload()
    parent = os.getppid()
    listener = _listen(socket_path)
    try:
        while True:
            if os.getppid() != parent:  # the pool died: nobody can hand us a pod any more
                return None
            try:
                conn, _ = listener.accept()
                break
            except TimeoutError:
                continue
    finally:
        listener.close()
        _unlink(socket_path)
    with conn:
        return _receive_assignment(conn)


def _listen(path: str) -> socket.socket:
    _unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 from the start
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(1)
    sock.settimeout(PARENT_CHECK_S)
    return sock


def _receive_assignment(conn: socket.socket) -> list[str] | None:
    """Take the pod from `start` and become its daemon (returns the daemon's arguments), or refuse
    it (None)."""
    conn.settimeout(5.0)
    fds: list[int] = []
    try:
        peer_pid, peer_uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if peer_uid != os.getuid():
            raise ValueError("peer is another user")
        data, fds = _recv_with_fds(conn)
        request = json.loads(data)
        argv, cwd, env = request["argv"], request["cwd"], request["env"]
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(cwd, str)
                and isinstance(env, dict) and len(fds) == 1):
            raise ValueError("want argv (strings), cwd, env and one listening socket")
        os.chdir(cwd)
        _reply(conn, {"ok": True, "pid": os.getpid()})
        if _read_line(conn).strip() != b"go":
            raise HandOffError("start did not confirm")
    except (OSError, ValueError, KeyError, HandOffError) as exc:
        for fd in fds:
            os.close(fd)
        try:
            _reply(conn, {"ok": False, "reason": str(exc)})
        except OSError:
            pass  # start is gone already
        return None
    _become_daemon(argv, env, fds[0], peer_pid)
    return argv


def _recv_with_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request line and the fds that came with its first bytes."""
    fds = array.array("i")
    data, ancdata, _flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    received = list(fds)
    while not data.endswith(b"\n"):
        chunk = conn.recv(MAX_MESSAGE)
        if not chunk or len(data) > MAX_MESSAGE:
            for fd in received:
                os.close(fd)
            raise ValueError("truncated request")
        data += chunk
    return data, received


def _reply(conn: socket.socket, message: dict[str, object]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _become_daemon(argv: list[str], env: dict[str, str], listen_fd: int, starter_pid: int) -> None:
    """Look and be accounted like the daemon `start` would have spawned."""
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.environ[LISTEN_FD_ENV] = str(listen_fd)
    os.environ[ASSIGNED_ENV] = f"{time.clock_gettime(time.CLOCK_BOOTTIME):.3f}"
    errors = join_cgroups_of(starter_pid)
    if errors:
        print(f"kata-py spare: cgroups: {'; '.join(errors)}", file=sys.stderr)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    set_cmdline([sys.executable, "-m", "shim", *argv])


def join_cgroups_of(pid: int) -> list[str]:
    """Move this process into the cgroup `pid` is in, in every hierarchy (v1 and v2). Returns what
    failed (best effort: a shim outside containerd's cgroup still works)."""
    errors: list[str] = []
    try:
        theirs = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        ours = set(Path("/proc/self/cgroup").read_text().splitlines())
        mounts = _cgroup_mounts()
    except OSError as exc:
        return [str(exc)]
    for line in theirs:
        if line in ours:
            continue
        _, controllers, path = line.split(":", 2)
        mount = mounts.get(controllers)
        if mount is None:
            errors.append(f"no mount for cgroup hierarchy {controllers or 'v2'!r}")
            continue
        try:
            Path(mount, path.lstrip("/"), "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            errors.append(f"{controllers or 'v2'}:{path}: {exc}")
    return errors


def _cgroup_mounts() -> dict[str, str]:
    """Mount point of each cgroup hierarchy, keyed as /proc/<pid>/cgroup names it ("" for v2,
    "cpu,cpuacct", "name=systemd", ...)."""
    mounts: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue
        if tail[0] == "cgroup2":
            mounts.setdefault("", fields[4])
        elif tail[0] == "cgroup":
            known = [o for o in tail[2].split(",") if o not in ("rw", "ro") and "=" not in o or o.startswith("name=")]
            for key in (",".join(known), ",".join(o for o in known if o not in ("xattr", "clone_children"))):
                mounts.setdefault(key, fields[4])
    return mounts


def set_cmdline(args: list[str]) -> None:
    """Rewrite /proc/self/cmdline in place (the argv area the kernel shows; CPython copied its argv
    long ago). The spare was started with args.CMDLINE_ROOM bytes of padding so that the daemon's
    arguments fit; longer ones are cut. Best effort."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(stat[45]), int(stat[46])  # arg_start, arg_end: fields 48 and 49
    except (OSError, ValueError, IndexError):
        return
    size = end - start
    if size <= 1:
        return
    import ctypes  # only a spare needs it; `start` imports this module too

    new = b"\0".join(os.fsencode(a) for a in args)[: size - 1]
    ctypes.memmove(start, new.ljust(size, b"\0"), size)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
