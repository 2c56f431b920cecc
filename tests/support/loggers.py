"""A binary:// logger for tests: what it was given (argv, environment as exec'd, open fds and where
they point, its pid) goes to <dir>/info.json, fd 3 to <dir>/stdout, fd 4 to <dir>/stderr, and
<dir>/done once both reached EOF. Arguments come from the URI's query: `dir=<path>` (required),
`ready-byte=1` (write a byte to fd 5 before closing it, as binary-v2 wants), `orphan=1` (leave a
grandchild, orphaned at once, that exits a second later; its pid in <dir>/orphan.pid)."""

from __future__ import annotations

import sys
from pathlib import Path

RECORDER = """#!PYTHON
import json, os, sys, threading
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
out = args["dir"]
fds = {}
for n in os.listdir("/proc/self/fd"):
    try:
        fds[int(n)] = os.readlink(f"/proc/self/fd/{n}")
    except OSError:  # the directory listdir had open
        pass
with open("/proc/self/environ", "rb") as f:  # as exec'd (Python itself adds LC_CTYPE to os.environ)
    env = dict(kv.decode().split("=", 1) for kv in f.read().split(b"\\0") if kv)
with open(os.path.join(out, "info.json"), "w") as f:
    json.dump({"argv": sys.argv, "env": env, "fds": fds, "pid": os.getpid()}, f)
def copy(fd, name):
    with open(os.path.join(out, name), "wb") as f:
        while chunk := os.read(fd, 65536):
            f.write(chunk)
if "orphan" in args:  # leave a grandchild that outlives its parent by a second, orphaned at once
    if os.fork() == 0:
        if os.fork() == 0:
            with open(os.path.join(out, "orphan.pid"), "w") as f:
                f.write(str(os.getpid()))
            import time
            time.sleep(1)
        os._exit(0)
    os.wait()
threads = [threading.Thread(target=copy, args=(fd, name)) for fd, name in ((3, "stdout"), (4, "stderr"))]
for t in threads:
    t.start()
if "ready-byte" in args:
    os.write(5, b"r")
os.close(5)
for t in threads:
    t.join()
open(os.path.join(out, "done"), "w").close()
""".replace("PYTHON", sys.executable, 1)


def install_recorder(path: Path) -> str:
    """Write the recorder to `path` (executable); return its path."""
    path.write_text(RECORDER)
    path.chmod(0o755)
    return str(path)
