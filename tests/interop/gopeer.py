"""Build and run the Go ttrpc peer (tests/interop/gottrpc) against containerd/ttrpc 1.1.1.

The binary is built in GOPATH mode from Debian's sources (golang-github-containerd-ttrpc-dev,
golang-github-gogo-protobuf-dev) and cached under ~/.cache/kata-py/gottrpc/<hash>/, keyed by the Go
source and the Go version, so only the first run pays the ~10 s build.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SOURCE = Path(__file__).parent / "gottrpc" / "main.go"
GOPATH = "/usr/share/gocode"
SERVICE = "kata.test.Echo"


class GoPeerUnavailable(RuntimeError):
    """The Go toolchain or the ttrpc sources are missing, or the build failed."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kata-py" / "gottrpc"


def build_go_peer() -> Path:
    """Return the path of the built peer, building it on a cache miss.

    Raises GoPeerUnavailable with the reason (no `go`, no sources, compiler output).
    """
    go = shutil.which("go")
    if go is None:
        raise GoPeerUnavailable("`go` not found on PATH (apt-get install golang-go)")
    if not Path(GOPATH, "src/github.com/containerd/ttrpc").is_dir():
        raise GoPeerUnavailable(f"containerd/ttrpc sources missing under {GOPATH} "
                                "(apt-get install golang-github-containerd-ttrpc-dev)")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = cache_root() / digest / "gottrpc"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:
        out = Path(tmp) / "gottrpc"
        env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="")
        proc = subprocess.run([go, "build", "-o", str(out), str(SOURCE)], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise GoPeerUnavailable(f"go build failed:\n{proc.stderr}")
        os.replace(out, binary)  # atomic: concurrent builders can't see a half-written file
    return binary


@contextmanager
def go_server(binary: Path, socket_path: str, timeout: float = 10.0) -> Iterator[subprocess.Popen[str]]:
    """Run `gottrpc server` on socket_path until the block exits (the process is always reaped).

    It exits by itself when its stdin closes, so a crashed test run leaves nothing behind.
    """
    proc = subprocess.Popen([str(binary), "server", "-socket", socket_path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the Go side prints READY right after listen(), or exits with an error
        line = _readline_with_timeout(proc, timeout)
        if line.strip() != "READY":
            proc.kill()
            proc.wait()
            stderr = proc.stderr.read() if proc.stderr else ""
            raise GoPeerUnavailable(f"Go server did not start: {line!r} {stderr}")
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _readline_with_timeout(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise GoPeerUnavailable(f"Go server printed nothing in {timeout}s")
    return proc.stdout.readline()
