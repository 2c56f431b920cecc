"""Runtime configuration: a TOML file in Kata's spirit, every key optional.

Looked up in this order: the path containerd passes (runtimeoptions.v1.Options.config_path, from the
CRI `options.ConfigPath`), $KATA_PY_CONFIG, /etc/kata-py/configuration.toml; else the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

DEFAULT_CONFIG_PATH = "/etc/kata-py/configuration.toml"
DEFAULT_GUEST_CACHE = "/var/cache/kata-py/guest"
DEFAULT_TEMPLATE_DIR = "/var/cache/kata-py/templates"


@dataclass(frozen=True)
class HypervisorConfig:
    accel: str = "auto"  # auto | kvm | tcg
    guest_dir: str = ""  # directory with vmlinux, initrd.img, rootfs.erofs; "" = guest cache "current"
    kernel_params: str = ""
    default_vcpus: int = 1
    max_vcpus: int = 4
    default_memory_mib: int = 512
    max_memory_mib: int = 4096
    memory_slots: int = 8
    memory_hotplug: str = "pc-dimm"  # pc-dimm | virtio-mem
    tb_size_mib: int = 64  # TCG translation buffer; QEMU's 1 GiB default bloats every VM
    # multi-threaded TCG crashes QEMU 7.2 on vCPU hot-plug once its buffer slices run out
    tcg_multithread: bool = False
    machine: str = "q35"
    # directories whose files io.katacontainers.config.hypervisor.{kernel,initrd,image} may name
    valid_asset_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    dial_timeout_s: float = 120.0  # a cold TCG boot takes ~8 s; a loaded CI machine much more
    # auto: virtio-serial whenever templates or the pool are on (a vsock guest keeps the template's
    # CID, so it cannot be templated: every start would boot cold), vsock where the host has it
    # otherwise; serial / vsock: that one
    channel: str = "auto"
    oci_runtime: str = ""  # "" = the agent's default (crun when present)


@dataclass(frozen=True)
class RuntimeConfig:
    state_dir: str = "/run/kata-py"
    # Annotations honoured only through this allowlist (regexes on the key after "io.katacontainers.")
    enable_annotations: tuple[str, ...] = ()
    sandbox_cgroup_only: bool = False
    debug: bool = False


@dataclass(frozen=True)
class FactoryConfig:
    """VM templates and the warm pool (shim/factory/)."""

    template: bool = True  # restore sandboxes from a snapshot of a booted guest
    template_dir: str = ""  # "" = DEFAULT_TEMPLATE_DIR ($KATA_PY_TEMPLATE_DIR overrides it)
    template_cache_max_mb: int = 4096  # disk use (allocated blocks) of all templates; oldest go first
    pool_socket: str = ""  # a `kata-py pool` service to ask for a ready VM first; "" = no pool
    pool_size: int = 2  # VMs `kata-py pool` keeps ready
    pool_shims: int = 1  # spare shim daemons `kata-py pool` keeps ready (shim/spare.py); 0 = none

    def template_path(self) -> Path:
        return Path(self.template_dir or os.environ.get("KATA_PY_TEMPLATE_DIR", DEFAULT_TEMPLATE_DIR))


@dataclass(frozen=True)
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    source: str = ""  # where it was read from, for logs

    def guest_dir(self) -> Path:
        if self.hypervisor.guest_dir:
            return Path(self.hypervisor.guest_dir)
        cache = os.environ.get("KATA_PY_GUEST_DIR") or os.environ.get("KATA_PY_GUEST_CACHE", DEFAULT_GUEST_CACHE)
        path = Path(cache)
        return path if (path / "vmlinux").exists() else path / "current"


def _section(cls: type, raw: dict[str, Any], name: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise InvalidArgument(f"config [{name}]: unknown key {key!r}")
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"config [{name}] {key}: expected a list of strings")
            value = tuple(value)
        elif isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default)):
            if not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                raise InvalidArgument(f"config [{name}] {key}: expected {type(default).__name__}, "
                                      f"got {type(value).__name__}")
        values[key] = value
    return cls(**values)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Raises InvalidArgument naming the bad key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config {source}: {exc}") from None
    sections = {"hypervisor": HypervisorConfig, "agent": AgentConfig, "runtime": RuntimeConfig,
                "factory": FactoryConfig}
    unknown = set(raw) - set(sections)
    if unknown:
        raise InvalidArgument(f"config {source}: unknown section(s) {sorted(unknown)}")
    parts = {name: _section(cls, raw.get(name, {}), name) for name, cls in sections.items()}
    cfg = Config(**parts, source=source)
    h = cfg.hypervisor
    if h.accel not in ("auto", "kvm", "tcg"):
        raise InvalidArgument(f"config [hypervisor] accel: {h.accel!r} is not auto, kvm or tcg")
    if cfg.agent.channel not in ("auto", "serial", "vsock"):
        raise InvalidArgument(f"config [agent] channel: {cfg.agent.channel!r} is not auto, serial or vsock")
    if h.memory_hotplug not in ("pc-dimm", "virtio-mem"):
        raise InvalidArgument(f"config [hypervisor] memory_hotplug: {h.memory_hotplug!r}")
    if not 1 <= h.default_vcpus <= h.max_vcpus:
        raise InvalidArgument("config [hypervisor]: need 1 <= default_vcpus <= max_vcpus")
    if not 128 <= h.default_memory_mib <= h.max_memory_mib:
        raise InvalidArgument("config [hypervisor]: need 128 <= default_memory_mib <= max_memory_mib")
    if min(cfg.factory.template_cache_max_mb, cfg.factory.pool_size, cfg.factory.pool_shims) < 0:
        raise InvalidArgument("config [factory]: template_cache_max_mb, pool_size and pool_shims must be >= 0")
    return cfg


def load_config(path: str | None = None) -> Config:
    """Read the configuration; a missing default file means defaults. Raises InvalidArgument."""
    candidates = [path] if path else [os.environ.get("KATA_PY_CONFIG", ""), DEFAULT_CONFIG_PATH]
    for candidate in filter(None, candidates):
        p = Path(candidate)
        if p.is_file():
            return parse_config(p.read_text(), str(p))
        if path:
            raise InvalidArgument(f"config file {path} not found")
    return Config(source="defaults")
