"""OCI hooks of the sandbox spec, run on the host in the pod's network namespace (Kata and CRI-O do
the same: a VM runtime must run them itself, since the guest cannot run host binaries).

`prestart` and `createRuntime` hooks run once the VM is up and before the pod network is mirrored,
so a hook can still add interfaces to the netns; `poststop` hooks run after the VM is gone. Each hook
gets the OCI state on stdin, its own args and env, and its timeout (default 60 s).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import FailedPrecondition, InvalidArgument

DEFAULT_TIMEOUT_S = 60


@dataclass(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...]
    env: tuple[str, ...]
    timeout: float


def parse_hooks(spec: Mapping[str, Any], phase: str) -> list[Hook]:
    """The hooks of one phase. Raises InvalidArgument naming the bad field."""
    raw = (spec.get("hooks") or {}).get(phase) or []
    if not isinstance(raw, list):
        raise InvalidArgument(f"OCI spec field hooks.{phase}: expected a list")
    hooks = []
    for i, h in enumerate(raw):
        where = f"hooks.{phase}[{i}]"
        if not isinstance(h, dict) or not isinstance(h.get("path"), str) or not h["path"].startswith("/"):
            raise InvalidArgument(f"OCI spec field {where}.path: must be an absolute path")
        args, env = h.get("args") or [h["path"]], h.get("env") or []
        if not all(isinstance(a, str) for a in [*args, *env]):
            raise InvalidArgument(f"OCI spec field {where}: args and env must be strings")
        timeout = h.get("timeout", DEFAULT_TIMEOUT_S)
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidArgument(f"OCI spec field {where}.timeout: must be a positive integer")
        hooks.append(Hook(h["path"], tuple(args), tuple(env), float(timeout)))
    return hooks


def oci_state(container_id: str, bundle: str, pid: int, status: str, annotations: Mapping[str, str]) -> bytes:
    return json.dumps({"ociVersion": "1.0.2", "id": container_id, "status": status, "pid": pid,
                       "bundle": bundle, "annotations": dict(annotations)}).encode()


def run_hooks(hooks: Sequence[Hook], state: bytes, phase: str) -> None:
    """Run hooks in order in the calling thread's namespaces (blocking: call from a worker thread).

    Raises FailedPrecondition naming the hook that failed or timed out (the runtime spec says a
    failing prestart hook fails the container's creation).
    """
    for hook in hooks:
        try:
            # args[0] is argv[0], as in the runtime spec; the program is `path`
            result = subprocess.run(list(hook.args), input=state, capture_output=True,
                                    env=dict(e.split("=", 1) for e in hook.env if "=" in e),
                                    executable=hook.path, timeout=hook.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise FailedPrecondition(f"{phase} hook {hook.path} timed out after {hook.timeout:.0f} s") from None
        except OSError as exc:
            raise FailedPrecondition(f"{phase} hook {hook.path}: {exc}") from None
        if result.returncode != 0:
            raise FailedPrecondition(f"{phase} hook {hook.path} exited {result.returncode}: "
                                     f"{result.stderr.decode(errors='replace').strip()[:500]}")
