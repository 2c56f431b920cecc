"""Drive an OCI runtime binary (runc or crun): one method per subcommand, no state of its own.

Commands that keep running container stdio (create, exec) get the process's fds as their own stdio
(runc/crun pass them through when detached) and report their errors through `--log`.
"""

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence

from agent.errors import Internal
from agent.reaper import Reaper

_CANDIDATES = (("crun", "/usr/bin/crun"), ("runc", "/usr/sbin/runc"))
_CONSOLE_TIMEOUT = 10.0


def find_runtime(preferred: str = "") -> tuple[str, str]:
    """Pick the runtime binary: `preferred` (a name or a path) or crun if present, else runc.

    Returns (name, path). Raises FileNotFoundError when none is installed.
    """
    if preferred:
        path = preferred if os.sep in preferred else shutil.which(preferred)
        if path and os.access(path, os.X_OK):
            return os.path.basename(path), path
        raise FileNotFoundError(f"OCI runtime {preferred!r} not found")
    for name, path in _CANDIDATES:
        found = path if os.access(path, os.X_OK) else shutil.which(name)
        if found:
            return name, found
    raise FileNotFoundError("neither crun nor runc is installed")


class OciRuntime:
    """runc/crun command lines with a private state root; every failure raises Internal."""

    def __init__(self, name: str, path: str, state_root: str, reaper: Reaper) -> None:
        self.name = name
        self.path = path
        self.state_root = state_root
        self._reaper = reaper
        self._version: str | None = None

    def _argv(self, *args: str, log: str | None = None) -> list[str]:
        argv = [self.path, "--root", self.state_root]
        if log:
            argv += ["--log", log, "--log-format", "json"]
        return argv + list(args)

    def _run(self, *args: str, input: bytes | None = None, timeout: float = 60.0) -> bytes:
        what = f"{self.name} {' '.join(args)}"
        try:
            done = self._reaper.run(self._argv(*args), input=input, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise Internal(f"{what}: {e}") from e
        if done.code != 0:
            raise Internal(f"{what}: exit {done.code}: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    def _run_detached(self, args: Sequence[str], log: str, stdio: Sequence[int],
                      console_socket: str | None) -> int | None:
        """Run create/exec with the process's stdio as the runtime's own; return the pty master fd
        (terminal mode) or None. Raises Internal with the runtime's logged error on failure."""
        what = f"{self.name} {args[0]}"
        sock = None
        if console_socket:
            # runc connects here and sends the pty master with SCM_RIGHTS; the listen backlog keeps
            # the connection until we accept it after the command returns.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(console_socket)
            sock.listen(1)
        try:
            since = self._reaper.mark()
            try:
                proc = self._reaper.spawn(self._argv(*args, log=log), stdin=stdio[0], stdout=stdio[1],
                                          stderr=stdio[2])
                code = self._reaper.wait(proc, since, timeout=60.0)
            except (OSError, TimeoutError) as e:
                raise Internal(f"{what}: {e}") from e
            if code != 0:
                raise Internal(f"{what}: exit {code}: {_last_log_error(log)}")
            if sock is None:
                return None
            sock.settimeout(_CONSOLE_TIMEOUT)
            try:
                conn, _ = sock.accept()
                with conn:
                    _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
            except OSError as e:
                raise Internal(f"{what}: no console from the runtime: {e}") from e
            if not fds:
                raise Internal(f"{what}: the runtime sent no pty master")
            return fds[0]
        finally:
            if sock is not None:
                sock.close()
                os.unlink(console_socket)  # type: ignore[arg-type]

    def create(self, container_id: str, bundle: str, pid_file: str, stdio: Sequence[int],
               console_socket: str | None = None) -> int | None:
        """`create --bundle B --pid-file P`. Returns the pty master fd in terminal mode, else None."""
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        return self._run_detached([*args, container_id], os.path.join(bundle, "log.json"), stdio,
                                  console_socket)

    def exec(self, container_id: str, process_file: str, pid_file: str, log: str, stdio: Sequence[int],
             console_socket: str | None = None) -> int | None:
        """`exec --detach --process F --pid-file P`. Returns the pty master fd in terminal mode."""
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        return self._run_detached([*args, container_id], log, stdio, console_socket)

    def version(self) -> str:
        """`--version`'s output, run once: the warm-up asks before READY (so templates carry it) and
        every create needs its spec version."""
        if self._version is None:
            self._version = self._run("--version").decode(errors="replace").strip()
        return self._version

    def start(self, container_id: str) -> None:
        if self.name == "crun" and self._release_crun_init(container_id):
            return
        self._run("start", container_id)

    def _release_crun_init(self, container_id: str) -> bool:
        """What `crun start` does for a container without poststart hooks (the guest spec never
        has hooks: agent/spec.py drops them): open the exec fifo its init is blocked reading,
        unlink it (crun reports "created" while it exists), write one byte. Saves exec'ing crun,
        ~0.2 s under TCG. False when the fifo is not there or has no reader (init gone): then
        `crun start` runs and reports the state in its own words."""
        fifo = os.path.join(self.state_root, container_id, "exec.fifo")
        try:
            # O_NONBLOCK: ENXIO rather than blocking forever when no init holds the read end
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            os.unlink(fifo)
            os.write(fd, b"\0")
        except OSError as e:
            raise Internal(f"{self.name} start {container_id}: exec fifo: {e}") from e
        finally:
            os.close(fd)
        return True

    def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        self._run("kill", *(["--all"] if all_processes else []), container_id, str(signal))

    def delete(self, container_id: str) -> None:
        self._run("delete", "--force", container_id)

    def pause(self, container_id: str) -> None:
        self._run("pause", container_id)

    def resume(self, container_id: str) -> None:
        self._run("resume", container_id)

    def update(self, container_id: str, resources_json: bytes) -> None:
        # "--resources -" makes crun open /dev/stdin, which a guest without udev may not have: use a file
        with tempfile.NamedTemporaryFile(prefix=f"update-{container_id}-", suffix=".json",
                                         dir=self.state_root) as f:
            f.write(resources_json)
            f.flush()
            self._run("update", "--resources", f.name, container_id)

    def ps(self, container_id: str) -> list[int]:
        """Pids (in the agent's namespace) of every process in the container's cgroup."""
        out = self._run("ps", "--format", "json", container_id)
        pids = json.loads(out or b"[]")
        return [int(p) for p in pids or []]

    def list_ids(self) -> list[str]:
        """Ids of the containers the runtime knows under our state root."""
        out = self._run("list", "--format", "json")
        return [c["id"] for c in json.loads(out or b"[]") or []]


def _last_log_error(log: str) -> str:
    """The last message in a runtime's JSON log file (its reason for failing), or a placeholder."""
    try:
        with open(log, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return "(no runtime log)"
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            return line.decode(errors="replace")
        if entry.get("level") in ("error", "fatal") or entry.get("msg"):
            return str(entry.get("msg", entry))
    return "(empty runtime log)"


def read_pid_file(path: str) -> int:
    """Read a runtime pid file. Raises Internal if it is missing or garbage."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise Internal(f"pid file {path}: {e}") from e


def dev_null() -> int:
    """An fd on /dev/null for stdio the host did not ask for."""
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

