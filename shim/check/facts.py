"""What `kata-py check` and `kata-py env` know about a host: plain data, gathered by `probe.py` and
judged by `checks.py` (so tests feed made-up facts to the judges)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmm.accel import KvmProbe

from ..config import Config


@dataclass(frozen=True)
class ProbeFailed:
    """A probe that raised: its check reports this instead of the report dying."""

    error: str


@dataclass(frozen=True)
class KvmFacts:
    requested: str  # [hypervisor] accel
    probe: KvmProbe  # vmm.accel's own probe: the shim decides from exactly this
    create_vm_error: str | None  # None: KVM_CREATE_VM worked; "" : not tried (the device did not open)


@dataclass(frozen=True)
class VsockFacts:
    device: str
    exists: bool


@dataclass(frozen=True)
class QemuFacts:
    binary: str  # what the shim runs (looked up on PATH)
    path: str | None
    version_line: str  # first line of `--version`; "" when it did not run
    error: str = ""


@dataclass(frozen=True)
class GuestFacts:
    dir: str  # config.guest_dir()
    resolved: str  # its real path ("" when it does not exist)
    missing: tuple[str, ...]  # GUEST_FILES not there
    manifest: dict[str, Any] | None
    manifest_error: str = ""
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplateFacts:
    enabled: bool  # [factory] template
    root: str
    key: str = ""
    status: str = "unkeyed"  # valid | missing | invalid | untemplatable | unkeyed
    detail: str = ""  # why invalid / untemplatable / unkeyed
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KataRuntime:
    """A containerd runtime (CRI handler) whose runtime_type is kata-py's."""

    file: str
    plugin: str  # e.g. io.containerd.grpc.v1.cri
    name: str  # the handler name (RuntimeClass.handler)
    config_path: str = ""  # options.ConfigPath: the kata-py configuration the shim is given
    config_path_exists: bool = True
    runtime_path: str = ""  # runtime_path: the shim binary, when not looked up on PATH
    runtime_path_ok: bool = True  # an executable file


@dataclass(frozen=True)
class ContainerdConfigFacts:
    path: str
    exists: bool
    version: int = 1  # containerd's default when the file does not say
    error: str = ""  # unreadable or bad TOML (containerd would not start)
    files: tuple[str, ...] = ()  # the file and its imports
    runtimes: tuple[KataRuntime, ...] = ()
    disabled_plugins: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerdFacts:
    path: str | None
    version_line: str = ""
    error: str = ""
    pid: int | None = None  # a running containerd
    search_path: str = ""  # the PATH containerd looks shims up on
    path_source: str = ""  # where search_path came from


@dataclass(frozen=True)
class ShimBinaryFacts:
    name: str
    found: str | None  # on containerd's PATH or next to the containerd binary
    elsewhere: str | None  # only on our own PATH
    interpreter: str = ""  # the #! of whichever of the two exists (a pip-installed script's Python)


@dataclass(frozen=True)
class CgroupFacts:
    version: int  # 1 or 2 (shim.resources.cgroups.detect_version)
    controllers: frozenset[str]
    unified_at: str = ""  # a hybrid host's cgroup2 mount


@dataclass(frozen=True)
class DirFacts:
    role: str  # state-dir | guest-cache | template-cache
    path: str
    exists: bool
    usable: bool  # writable (or creatable: its nearest existing parent is writable)
    existing: str  # the path or its nearest existing parent, where the numbers below come from
    free_bytes: int
    fs_type: str
    mount_point: str
    error: str = ""


@dataclass(frozen=True)
class HostFacts:
    euid: int
    config: Config
    config_error: str
    shim_code_error: str  # "" when the shim daemon's modules import in this Python
    kvm: KvmFacts | ProbeFailed
    vsock: VsockFacts | ProbeFailed
    qemu: QemuFacts | ProbeFailed
    guest: GuestFacts | ProbeFailed
    template: TemplateFacts | ProbeFailed
    containerd: ContainerdFacts | ProbeFailed
    containerd_config: ContainerdConfigFacts | ProbeFailed
    shim_binary: ShimBinaryFacts | ProbeFailed
    cgroups: CgroupFacts | ProbeFailed
    dirs: tuple[DirFacts | ProbeFailed, ...]
