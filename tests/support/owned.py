"""What this test run owns on the host, so that the leak check watches (and kills) only that.

Every process the run starts carries RUN_MARK in its environment (set once per pytest process and
inherited: containerd passes its environment to the shims, the shims to QEMU); directories the run
made are registered with `own`, and mounts below them are the run's. Another suite, or live pods on
the host, are never blamed and never killed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

RUN_MARK = "KATA_PY_TEST_RUN"
_names = 0

_roots: set[str] = set()


def mark_this_run() -> str:
    """The run's mark, set in os.environ (so every child inherits it) on first use."""
    return os.environ.setdefault(RUN_MARK, f"{os.getpid()}-{secrets.token_hex(6)}")


def own(path: str | Path) -> None:
    """Register a directory this run made: every mount below it is the run's."""
    _roots.add(os.path.normpath(str(path)))


def roots() -> frozenset[str]:
    return frozenset(_roots)


def is_under_owned(path: str) -> bool:
    return any(path == r or path.startswith(r + "/") for r in _roots)


def process_is_ours(pid: int) -> bool:
    """Whether `pid` carries this run's mark (False for a process gone or unreadable)."""
    mark = f"{RUN_MARK}={mark_this_run()}".encode()
    try:
        return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def run_tag() -> str:
    """Four hex digits naming this run in the names of what its tests make (netns, bridges, links)."""
    import hashlib
    return hashlib.sha256(mark_this_run().encode()).hexdigest()[:4]


def test_name(prefix: str) -> str:
    """A new name for a netns, bridge or link: `prefix`, the run's tag, a counter (<= 15 bytes for a
    link with a prefix of up to 7). The leak check counts exactly the names that carry the tag."""
    global _names
    _names += 1
    return f"{prefix}{run_tag()}{_names}"


def is_test_named(name: str, prefix: str = "kp") -> bool:
    return name.startswith(prefix) and run_tag() in name
