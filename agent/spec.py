"""Rewrite a host OCI runtime spec for the guest. Pure: dict in, dict out."""

import copy
import json
import re
from typing import Any

from agent.errors import InvalidArgument

CGROUP_PARENT = "kata-py"
_HOST_NS_PATH = re.compile(r"^/proc/\d+/ns/")


def parse_json(data: bytes, field: str) -> dict[str, Any]:
    """Decode a JSON object sent by the host. Raises InvalidArgument naming `field` if it is not one."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{field}: invalid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object")
    return value


def cgroups_path(container_id: str) -> str:
    """The cgroupfs path the agent gives a container (relative to the cgroup2 mount)."""
    return f"/{CGROUP_PARENT}/{container_id}"


# the namespaces CRI has a pod's containers join (paths of the pause container on the host)
POD_SHARED_NAMESPACES = ("ipc", "uts", "pid")
# the annotations naming a container's pod sandbox (containerd CRI, CRI-O)
SANDBOX_ID_KEYS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")


def pod_sandbox_id(spec: dict[str, Any]) -> str:
    """The id of the pod sandbox (pause) container a container belongs to, or ""."""
    annotations = spec.get("annotations") or {}
    for key in SANDBOX_ID_KEYS:
        if isinstance(annotations.get(key), str):
            return annotations[key]
    return ""


_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)?(?:[-+].*)?$")


def _major_minor(version: str) -> tuple[int, int] | None:
    m = _VERSION.match(version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def runtime_spec_version(version_output: str) -> str:
    """The runtime-spec version a runtime implements, from its `--version` output (runc and crun both
    print a `spec: 1.0.2-dev` line); "" when there is none."""
    for line in version_output.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "spec" and _major_minor(value.strip()):
            return value.strip()
    return ""


def fit_oci_version(version: str, runtime_version: str) -> str:
    """The ociVersion to give a runtime that implements runtime-spec `runtime_version`.

    containerd 1.7/2.x (built against runtime-spec 1.2) write ociVersion 1.2.x, and bookworm's crun
    1.8.1 refuses any 1.2 spec ("unknown version specified"). Within a major version runtime-spec
    minors only add optional fields, and a runtime ignores fields it does not know whatever version is
    declared, so declaring the version the runtime implements changes nothing it does: it runs the
    parts it knows, as it would anyway. So a newer 1.x minor is lowered to the runtime's version; an
    older one, another major, or an unparseable value is left alone (the runtime judges it).
    """
    ours, theirs = _major_minor(version), _major_minor(runtime_version)
    if ours is None or theirs is None or ours[0] != theirs[0] or ours <= theirs:
        return version
    return runtime_version


def guest_spec(spec: dict[str, Any], container_id: str, rootfs: str, terminal: bool,
               sandbox_init_pid: int = 0, runtime_version: str = "") -> dict[str, Any]:
    """Return a copy of `spec` fit to run in the guest.

    - root.path becomes `rootfs` (the guest path of the container's root filesystem);
    - the network namespace is removed (containers share the VM's network, which is the pod's);
      namespace paths naming host processes (/proc/<pid>/ns/...) mean nothing here: for the ipc,
      uts and pid namespaces CRI shares in a pod they name the pod's pause container, whose guest
      init is `sandbox_init_pid` (when given) and whose namespaces the container joins in the guest
      instead; other host paths are dropped (the container gets a namespace of its own);
    - hooks are dropped (they name host binaries);
    - AppArmor/SELinux labels are dropped (host policy; the guest kernel does not load it);
    - linux.cgroupsPath is set under the kata-py parent, whatever the host's cgroup driver used;
    - process.terminal follows the request;
    - a hostname gets the UTS namespace it needs; every container gets a cgroup namespace;
    - `net.*` sysctls are removed (without a network namespace of its own the runtime refuses them;
      pod_network_sysctls gives them to the caller, who sets them on the VM's, i.e. the pod's, network);
    - ociVersion is lowered to `runtime_version` (the runtime-spec version the guest runtime
      implements) when it names a newer minor of the same major (fit_oci_version).

    Raises InvalidArgument when the spec has no `process` object.
    """
    out = copy.deepcopy(spec)
    process = out.get("process")
    if not isinstance(process, dict):
        raise InvalidArgument(f"oci_spec_json: container {container_id}: spec has no process")
    process["terminal"] = terminal
    process.pop("apparmorProfile", None)
    process.pop("selinuxLabel", None)
    root = out.setdefault("root", {})
    root["path"] = rootfs
    out.pop("hooks", None)
    linux = out.setdefault("linux", {})
    linux.pop("mountLabel", None)
    namespaces = []
    for ns in linux.get("namespaces", []):
        if ns.get("type") == "network":
            continue
        ns = dict(ns)
        if _HOST_NS_PATH.match(ns.get("path", "")):
            if sandbox_init_pid and ns.get("type") in POD_SHARED_NAMESPACES:
                ns["path"] = f"/proc/{sandbox_init_pid}/ns/{ns['type']}"
            else:
                del ns["path"]
        namespaces.append(ns)
    if out.get("hostname") and not any(ns.get("type") == "uts" for ns in namespaces):
        # CRI leaves the UTS namespace out for host-network pods but still sets a hostname, which
        # runc/crun refuse without one; the VM is the pod's host, so a private UTS is right here
        namespaces.append({"type": "uts"})
    if not any(ns.get("type") == "cgroup" for ns in namespaces):
        # the guest is cgroup v2: like runc under containerd on a v2 host, each container gets its
        # own cgroup namespace, so its /sys/fs/cgroup is its own cgroup (memory.max, cpu.max: what
        # JVMs, Go and .NET size themselves from), whatever the host's cgroup version gave the spec
        namespaces.append({"type": "cgroup"})
    linux["namespaces"] = namespaces
    sysctls = linux.get("sysctl")
    if isinstance(sysctls, dict):  # net.* ones are the pod network's: see pod_network_sysctls
        linux["sysctl"] = {k: v for k, v in sysctls.items() if not str(k).startswith("net.")}
    linux["cgroupsPath"] = cgroups_path(container_id)
    if isinstance(out.get("ociVersion"), str) and runtime_version:
        out["ociVersion"] = fit_oci_version(out["ociVersion"], runtime_version)
    return out


_SYSCTL_KEY = re.compile(r"net(\.[A-Za-z0-9_-]+)+")


def pod_network_sysctls(spec: dict[str, Any]) -> dict[str, str]:
    """The spec's `net.*` sysctls (containerd 2.x gives every pod `net.ipv4.ip_unprivileged_port_start`):
    they belong to the pod's network namespace, which in the guest is the VM's own. Raises
    InvalidArgument for a key that is not a plain sysctl name (it becomes a /proc/sys path) or a value
    that is not a string."""
    sysctls = (spec.get("linux") or {}).get("sysctl") or {}
    if not isinstance(sysctls, dict):
        raise InvalidArgument("linux.sysctl must be an object")
    out = {}
    for key, value in sysctls.items():
        if not isinstance(key, str) or not key.startswith("net."):
            continue
        if not _SYSCTL_KEY.fullmatch(key) or not isinstance(value, str) or "\n" in value:
            raise InvalidArgument(f"linux.sysctl {key!r}: not a sysctl name and value")
        out[key] = value
    return out


def exec_process(process: dict[str, Any], terminal: bool) -> dict[str, Any]:
    """Return a copy of an OCI Process for `runtime exec --process`, with the guest-side fixes."""
    out = copy.deepcopy(process)
    out["terminal"] = terminal
    out.pop("apparmorProfile", None)
    out.pop("selinuxLabel", None)
    if not out.get("args"):
        raise InvalidArgument("process_json: args must not be empty")
    out.setdefault("cwd", "/")
    return out
