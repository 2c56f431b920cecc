"""The I/O half of `kata-py check` / `kata-py env`: look at the host and record facts.

Every part is guarded: a probe that raises becomes a ProbeFailed its check reports, so one odd host
detail never kills the report. Modules beyond the standard library, vmm.accel and the configuration
are imported inside the probes that need them: a broken install is a finding, not a traceback. Nothing here changes the host (KVM_CREATE_VM's VM is closed at once,
a template is validated, never removed). Slow parts (the two `--version` runs) run in threads.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from glob import glob
from pathlib import Path
from typing import TypeVar

from vmm.accel import KVM_API_VERSION, AccelChoice, choose_accel, probe_kvm

from ..config import DEFAULT_GUEST_CACHE, Config
from ..resources.cgroups import CGROUP_MOUNT, CgroupVersion, detect_version
from . import parse
from .facts import (
    CgroupFacts,
    ContainerdConfigFacts,
    ContainerdFacts,
    DirFacts,
    GuestFacts,
    HostFacts,
    KataRuntime,
    KvmFacts,
    ProbeFailed,
    QemuFacts,
    ShimBinaryFacts,
    TemplateFacts,
    VsockFacts,
)

T = TypeVar("T")

KVM_DEVICE = "/dev/kvm"
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO=0xAE, 0x01)
QEMU_BINARY = "qemu-system-x86_64"  # what vmm.qemu runs, looked up on PATH
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
# systemd's PATH for services (containerd.service sets none of its own)
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VERSION_TIMEOUT_S = 5


def guarded(fn: Callable[[], T]) -> T | ProbeFailed:
    try:
        return fn()
    except Exception as exc:  # one probe's surprise must not end the report
        return ProbeFailed(f"{type(exc).__name__}: {exc}")


def first_line(argv: list[str]) -> str:
    """First line of a `--version` run. Raises OSError, subprocess.SubprocessError."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, check=True)
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else ""


class Probe:
    """Looks at one host for one configuration."""

    def __init__(self, config: Config, config_error: str = "", containerd_config: str = DEFAULT_CONTAINERD_CONFIG,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.config_error = config_error
        self.containerd_config_path = containerd_config
        self.environ = os.environ if environ is None else environ
        self._mounts: list[parse.Mount] | None = None

    # ---- the whole host -------------------------------------------------------------------------
    def gather(self) -> HostFacts:
        with ThreadPoolExecutor(max_workers=2) as pool:
            qemu_f = pool.submit(guarded, self.qemu)
            containerd_f = pool.submit(guarded, self.containerd)
            code = self.shim_code()  # first: the guest and template probes use its modules
            kvm = guarded(self.kvm)
            guest = guarded(self.guest)
            qemu = qemu_f.result()
            containerd = containerd_f.result()
        return HostFacts(
            euid=os.geteuid(), config=self.config, config_error=self.config_error, shim_code_error=code, kvm=kvm,
            vsock=guarded(self.vsock), qemu=qemu, guest=guest,
            template=guarded(lambda: self.template(kvm, guest, qemu)),
            containerd=containerd, containerd_config=guarded(self.containerd_config),
            shim_binary=guarded(lambda: self.shim_binary(containerd)), cgroups=guarded(self.cgroups),
            dirs=tuple(guarded(partial(self.directory, role, path)) for role, path in self.dir_roles()))

    # ---- parts ----------------------------------------------------------------------------------
    def shim_code(self) -> str:
        """Why the shim daemon's modules (and so trio, grpc, the protos) do not import, or ""."""
        try:
            importlib.import_module("shim.daemon")
            return ""
        except Exception as exc:  # ImportError, SyntaxError, an API a dependency no longer has, ...
            return f"{type(exc).__name__}: {exc}"

    def kvm(self) -> KvmFacts:
        probe = probe_kvm(KVM_DEVICE)
        create_error: str | None = ""  # not tried: there is no KVM to ask
        if probe.opens and probe.api_version == KVM_API_VERSION:
            create_error = _create_vm(KVM_DEVICE) or None
        return KvmFacts(requested=self.config.hypervisor.accel, probe=probe, create_vm_error=create_error)

    def vsock(self) -> VsockFacts:
        from agent_client.transport import VSOCK_DEVICE  # imports grpc: a missing grpc is shim-code's finding

        return VsockFacts(device=VSOCK_DEVICE, exists=os.path.exists(VSOCK_DEVICE))

    def qemu(self) -> QemuFacts:
        path = shutil.which(QEMU_BINARY, path=self.environ.get("PATH"))
        if path is None:
            return QemuFacts(binary=QEMU_BINARY, path=None, version_line="", error="not found on PATH")
        try:
            return QemuFacts(binary=QEMU_BINARY, path=path, version_line=first_line([path, "--version"]))
        except (OSError, subprocess.SubprocessError) as exc:
            return QemuFacts(binary=QEMU_BINARY, path=path, version_line="", error=str(exc))

    def guest(self) -> GuestFacts:
        from ..vm_shape import GUEST_FILES  # the files a sandbox boots from

        d = self.config.guest_dir()
        if not d.is_dir():
            return GuestFacts(dir=str(d), resolved="", missing=GUEST_FILES, manifest=None)
        missing = tuple(f for f in GUEST_FILES if not (d / f).is_file())
        sizes = {f: (d / f).stat().st_size for f in GUEST_FILES if f not in missing}
        manifest, error = None, ""
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            if not isinstance(manifest, dict):
                manifest, error = None, "manifest.json is not an object"
        except (OSError, ValueError) as exc:
            error = str(exc)
        return GuestFacts(dir=str(d), resolved=str(d.resolve()), missing=missing, manifest=manifest,
                          manifest_error=error, sizes=sizes)

    def template(self, kvm: KvmFacts | ProbeFailed, guest: GuestFacts | ProbeFailed,
                 qemu: QemuFacts | ProbeFailed) -> TemplateFacts:
        f = self.config.factory
        root = f.template_path()
        if not f.template:
            return TemplateFacts(enabled=False, root=str(root))
        unkeyed = next((why for why in (
            isinstance(kvm, ProbeFailed) and "accelerator unknown",
            isinstance(guest, ProbeFailed) and "guest image unknown",
            isinstance(qemu, ProbeFailed) and "QEMU unknown",
            not isinstance(guest, ProbeFailed) and (guest.missing or not guest.resolved) and "no guest image",
            not isinstance(qemu, ProbeFailed) and not qemu.version_line and "QEMU does not run",
        ) if why), "")
        if unkeyed:
            return TemplateFacts(enabled=True, root=str(root), detail=unkeyed)
        assert isinstance(kvm, KvmFacts) and isinstance(guest, GuestFacts)
        try:
            accel = choose_accel(kvm.requested, kvm.probe)  # type: ignore[arg-type]
        except Exception as exc:  # AccelUnavailable: the kvm check says it
            return TemplateFacts(enabled=True, root=str(root), detail=f"no accelerator: {exc}")
        return _template_facts(self.config, Path(guest.resolved), accel, root)

    def containerd(self) -> ContainerdFacts:
        pid, exe, env_path = _running_containerd(self.containerd_config_path)
        path = exe or shutil.which("containerd", path=self.environ.get("PATH"))
        if env_path is not None:
            search, source = env_path, f"PATH of containerd pid {pid}"
        else:
            search, source = SERVICE_PATH, "systemd's service PATH (no containerd running with this config)"
        if path is None:
            return ContainerdFacts(path=None, error="not found on PATH", pid=pid, search_path=search,
                                   path_source=source)
        try:
            line = first_line([path, "--version"])
            return ContainerdFacts(path=path, version_line=line, pid=pid, search_path=search, path_source=source)
        except (OSError, subprocess.SubprocessError) as exc:
            return ContainerdFacts(path=path, error=str(exc), pid=pid, search_path=search, path_source=source)

    def containerd_config(self) -> ContainerdConfigFacts:
        path = self.containerd_config_path
        if not os.path.exists(path):
            return ContainerdConfigFacts(path=path, exists=False)
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            return ContainerdConfigFacts(path=path, exists=True, error=str(exc))
        files = [path]
        runtimes = parse.kata_runtimes(doc, path)
        for pattern in parse.config_imports(doc, path):
            for imported in sorted(glob(pattern)):
                try:
                    sub = tomllib.loads(Path(imported).read_text())
                except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                    return ContainerdConfigFacts(path=path, exists=True, version=parse.config_version(doc),
                                                 error=f"import {imported}: {exc}", files=tuple(files))
                files.append(imported)
                runtimes += parse.kata_runtimes(sub, imported)
        runtimes = [_with_files_checked(r) for r in runtimes]
        disabled = doc.get("disabled_plugins")
        return ContainerdConfigFacts(path=path, exists=True, version=parse.config_version(doc), files=tuple(files),
                                     runtimes=tuple(runtimes),
                                     disabled_plugins=tuple(map(str, disabled)) if isinstance(disabled, list) else ())

    def shim_binary(self, containerd: ContainerdFacts | ProbeFailed) -> ShimBinaryFacts:
        name = parse.SHIM_BINARY
        dirs = []
        if isinstance(containerd, ContainerdFacts):
            dirs = parse.path_entries(containerd.search_path)
            if containerd.path:  # containerd also runs a shim that sits next to its own binary
                dirs.append(os.path.dirname(containerd.path))
        found = shutil.which(name, path=os.pathsep.join(dirs)) if dirs else None
        elsewhere = None if found else shutil.which(name, path=self.environ.get("PATH"))
        return ShimBinaryFacts(name=name, found=found, elsewhere=elsewhere, interpreter=_shebang(found or elsewhere))

    def cgroups(self) -> CgroupFacts:
        version = detect_version(CGROUP_MOUNT)
        if version is CgroupVersion.V2:
            text = Path(CGROUP_MOUNT, "cgroup.controllers").read_text()
            return CgroupFacts(version=2, controllers=frozenset(text.split()))
        mounts = self.mounts()
        enabled = parse.proc_cgroups_enabled(Path("/proc/cgroups").read_text())
        return CgroupFacts(version=1, controllers=frozenset(parse.v1_controllers(mounts, enabled)),
                           unified_at=parse.unified_mount(mounts, CGROUP_MOUNT))

    def dir_roles(self) -> list[tuple[str, Path]]:
        roles = [("state-dir", Path(self.config.runtime.state_dir))]
        if not self.config.hypervisor.guest_dir and not os.environ.get("KATA_PY_GUEST_DIR"):
            # where packaging/guest/build_guest.py builds (a named guest dir is only read)
            roles.append(("guest-cache", Path(os.environ.get("KATA_PY_GUEST_CACHE", DEFAULT_GUEST_CACHE))))
        if self.config.factory.template:
            roles.append(("template-cache", self.config.factory.template_path()))
        return roles

    def directory(self, role: str, path: Path) -> DirFacts:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        real = os.path.realpath(existing)
        st = os.statvfs(real)
        mount = parse.mount_of(real, self.mounts())
        exists = path.exists()
        error = ""
        if exists and not path.is_dir():
            error = "not a directory"
        elif not existing.is_dir():
            error = f"{existing} is not a directory"
        usable = not error and os.access(real, os.W_OK | os.X_OK)
        return DirFacts(role=role, path=str(path), exists=exists, usable=usable, existing=str(existing),
                        free_bytes=st.f_bavail * st.f_frsize, fs_type=mount.fs_type if mount else "",
                        mount_point=mount.point if mount else "", error=error)

    def mounts(self) -> list[parse.Mount]:
        if self._mounts is None:
            self._mounts = parse.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        return self._mounts


def _create_vm(dev: str) -> str:
    """"" when KVM_CREATE_VM gives a VM (closed at once), else why not."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return str(exc)
    try:
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        return ""
    except OSError as exc:
        return str(exc)
    finally:
        os.close(fd)


def _template_facts(config: Config, guest: Path, accel: AccelChoice, root: Path) -> TemplateFacts:
    """The key a sandbox of this configuration would look up, and what the store holds for it."""
    from agent_client.transport import vsock_available

    from ..factory.key import NoTemplate, guest_image_hash, qemu_version, template_key
    from ..factory.store import MIB, TemplateInvalid, TemplateStore
    from ..vm_shape import read_guest, vm_config

    cfg = vm_config(config, "kata-py-check", read_guest(guest), vsock=vsock_available())
    try:
        key = template_key(cfg, accel, guest_image_hash(cfg), qemu_version())
    except NoTemplate as exc:
        return TemplateFacts(enabled=True, root=str(root), status="untemplatable", detail=str(exc))
    if not (root / key).exists():
        return TemplateFacts(enabled=True, root=str(root), key=key, status="missing")
    store = TemplateStore(root, config.factory.template_cache_max_mb * MIB)
    try:
        template = store.validate(key)  # not lookup: that would remove a broken one
    except TemplateInvalid as exc:
        return TemplateFacts(enabled=True, root=str(root), key=key, status="invalid", detail=str(exc))
    return TemplateFacts(enabled=True, root=str(root), key=key, status="valid", meta=template.meta)


def _running_containerd(config_path: str) -> tuple[int | None, str | None, str | None]:
    """(pid, binary, PATH) of the running containerd that reads `config_path`, or Nones. Its PATH is
    what it finds shims on; other containerds (private test instances) are not the one we check."""
    want = os.path.realpath(config_path)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if Path(entry.path, "comm").read_text().strip() != "containerd":
                continue
            argv = [a.decode(errors="replace") for a in Path(entry.path, "cmdline").read_bytes().split(b"\0")]
            if os.path.realpath(parse.containerd_config_arg(argv[1:]) or DEFAULT_CONTAINERD_CONFIG) != want:
                continue
            exe = os.readlink(os.path.join(entry.path, "exe"))
            env = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        path = next((e[5:].decode(errors="replace") for e in env if e.startswith(b"PATH=")), "")
        return int(entry.name), exe, path
    return None, None, None


def _shebang(path: str | None) -> str:
    """The interpreter a `#!/path/python` script names ("" for anything else)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            line = f.readline(256)
    except OSError:
        return ""
    if not line.startswith(b"#!"):
        return ""
    words = line[2:].decode(errors="replace").split()
    return words[0] if words and "python" in os.path.basename(words[0]) else ""


def _with_files_checked(rt: KataRuntime) -> KataRuntime:
    """Whether the files the runtime names are there (ConfigPath, runtime_path)."""
    return replace(rt, config_path_exists=not rt.config_path or os.path.isfile(rt.config_path),
                   runtime_path_ok=not rt.runtime_path or (os.path.isfile(rt.runtime_path)
                                                           and os.access(rt.runtime_path, os.X_OK)))
