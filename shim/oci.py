"""OCI bundle handling: load and validate config.json, read the CRI annotations that group a pod.

Validation is deliberately about what we use: a malformed or unsupported spec is refused with an
InvalidArgument that names the field, before anything reaches the VM.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

# containerd CRI (pkg/cri/annotations) and CRI-O (the seeds' kata-oci-utils) spell them differently
CONTAINER_TYPE_KEYS = ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType")
SANDBOX_ID_KEYS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")
# runc's own grouping annotation, honoured the same way containerd's runc shim does
GROUP_KEY = "io.containerd.runc.v2.group"
SANDBOX_TYPES = {"sandbox"}
CONTAINER_TYPES = {"container"}

# containerd's own identifier rule (pkg/identifiers): alphanumeric runs joined by single `.`, `_` or
# `-`, at most 76 characters. Ids name directories and sockets on the host, so every id that comes
# from outside (container, exec, grouping/sandbox) passes it whole: fullmatch, since `$` would let a
# trailing newline through.
_ID = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
MAX_ID_LENGTH = 76


def validate_id(value: object, what: str = "id") -> str:
    """Raises InvalidArgument unless value is an identifier containerd itself would accept."""
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH or not _ID.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r} is not a valid identifier (containerd's rule: "
                              f"[A-Za-z0-9]+ joined by single '.', '_' or '-', at most {MAX_ID_LENGTH} characters)")
    return value


@dataclass(frozen=True)
class PodRole:
    """Where a container sits in its pod."""

    sandbox_id: str  # the grouping key: one shim and one VM per value
    is_sandbox: bool  # the pause container (or a lone ctr container) owns the VM


def container_type(annotations: dict[str, str]) -> str:
    """"sandbox", "container", or "" for a container outside any pod (plain ctr)."""
    return next((annotations[k] for k in CONTAINER_TYPE_KEYS if k in annotations), "")


def pod_role(container_id: str, annotations: dict[str, str]) -> PodRole:
    """Raises InvalidArgument on an unknown container type or a container without its sandbox id."""
    ctype = container_type(annotations)
    sandbox_id = next((annotations[k] for k in (GROUP_KEY, *SANDBOX_ID_KEYS) if k in annotations), "")
    if ctype and ctype not in SANDBOX_TYPES | CONTAINER_TYPES:
        raise InvalidArgument(f"annotation container-type: unknown value {ctype!r}")
    if ctype in CONTAINER_TYPES:
        if not sandbox_id:
            raise InvalidArgument("container of a pod without a sandbox-id annotation")
        return PodRole(validate_id(sandbox_id, "sandbox id"), is_sandbox=False)
    if sandbox_id and sandbox_id != container_id and not ctype:
        return PodRole(validate_id(sandbox_id, "sandbox id"), is_sandbox=False)
    return PodRole(container_id, is_sandbox=True)


def grouping_id(container_id: str, annotations: dict[str, str]) -> str:
    """The id whose shim serves this container (containerd's runc manager does the same).

    Raises InvalidArgument for an id that is not an identifier (it names the pod's state dir)."""
    for key in (GROUP_KEY, *SANDBOX_ID_KEYS):
        if annotations.get(key):
            return validate_id(annotations[key], key)
    return validate_id(container_id, "container id")


def _expect(obj: Any, typ: type | tuple[type, ...], field: str) -> Any:
    if not isinstance(obj, typ) or (typ is int and isinstance(obj, bool)):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise InvalidArgument(f"OCI spec field {field}: expected {names}, got {type(obj).__name__}")
    return obj


def validate_process(process: Any, field: str = "process") -> dict[str, Any]:
    """Check the parts of an OCI Process we rely on. Raises InvalidArgument naming the field."""
    _expect(process, dict, field)
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(f"OCI spec field {field}.args: must be a non-empty list of strings")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidArgument(f"OCI spec field {field}.cwd: must be an absolute path")
    env = process.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise InvalidArgument(f"OCI spec field {field}.env: must be a list of strings")
    if "terminal" in process:
        _expect(process["terminal"], bool, f"{field}.terminal")
    user = process.get("user", {})
    _expect(user, dict, f"{field}.user")
    for key in ("uid", "gid"):
        if key in user:
            _expect(user[key], int, f"{field}.user.{key}")
    return process


def validate_spec(spec: Any) -> dict[str, Any]:
    """Raises InvalidArgument naming the first bad field."""
    _expect(spec, dict, "(root)")
    version = spec.get("ociVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise InvalidArgument(f"OCI spec field ociVersion: unsupported {version!r} (need 1.x)")
    validate_process(spec.get("process"))
    root = spec.get("root", {})
    _expect(root, dict, "root")
    if "path" in root:
        _expect(root["path"], str, "root.path")
    annotations = spec.get("annotations", {})
    _expect(annotations, dict, "annotations")
    for key, value in annotations.items():
        _expect(value, str, f"annotations[{key!r}]")
    mounts = spec.get("mounts", [])
    _expect(mounts, list, "mounts")
    for i, mount in enumerate(mounts):
        _expect(mount, dict, f"mounts[{i}]")
        dest = mount.get("destination")
        if not isinstance(dest, str) or not dest.startswith("/"):
            raise InvalidArgument(f"OCI spec field mounts[{i}].destination: must be an absolute path")
    linux = spec.get("linux", {})
    _expect(linux, dict, "linux")
    if "resources" in linux:
        _expect(linux["resources"], dict, "linux.resources")
    for i, ns in enumerate(linux.get("namespaces", [])):
        _expect(ns, dict, f"linux.namespaces[{i}]")
        _expect(ns.get("type"), str, f"linux.namespaces[{i}].type")
    return spec


# Host namespaces a VM cannot give a pod: its network and IPC live in the guest kernel. (A host PID
# namespace is the VM's, as for every container of the pod: kubelet's semantics hold inside the VM.)
_HOST_NAMESPACES = {"network": "hostNetwork", "ipc": "hostIPC"}


def refuse_host_namespaces(spec: dict[str, Any]) -> None:
    """Raises InvalidArgument for a CRI pod sandbox that asks for the host's network or IPC namespace.

    CRI says so by leaving the namespace out of the sandbox container's spec. Refused before anything
    starts (the pod fails at RunPodSandbox and nothing is left behind), naming the field; plain `ctr`
    containers are outside this rule (their VM has its own network either way).
    """
    if container_type(spec.get("annotations") or {}) not in SANDBOX_TYPES:
        return
    present = {ns.get("type") for ns in (spec.get("linux") or {}).get("namespaces", [])}
    wanted = [k8s for ns, k8s in _HOST_NAMESPACES.items() if ns not in present]
    if wanted:
        fields = " and ".join(f"{k8s}: true" for k8s in wanted)
        raise InvalidArgument(
            f"pod asks for the host's namespaces ({fields}; the sandbox spec's linux.namespaces lacks "
            f"{', '.join(repr(ns) for ns, k8s in _HOST_NAMESPACES.items() if k8s in wanted)}): kata-py runs every "
            "pod in its own VM, which cannot share the host's network or IPC; run this pod with a runc "
            "RuntimeClass instead")


def load_spec(bundle: str | Path) -> dict[str, Any]:
    """Read and validate <bundle>/config.json. Raises InvalidArgument."""
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"bundle {bundle}: config.json not found") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"bundle {bundle}: config.json unreadable: {exc}") from None
    return validate_spec(spec)


def annotations_of(bundle: str | Path) -> dict[str, str]:
    """Annotations of a bundle's spec, or {} when it is missing or broken (start/delete must not fail)."""
    try:
        spec = json.loads((Path(bundle) / "config.json").read_text())
        ann = spec.get("annotations") or {}
        return {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        return {}
