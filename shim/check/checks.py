"""The judges of `kata-py check`: pure functions from HostFacts to results, each naming what it
found and, when something is wrong, the fix.

A host can run pods when no result is FAIL; a warning costs something (speed, a feature) but pods
run. A check that raises, or whose probe failed, is a FAIL: an unknown is not a pass.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmm.accel import KVM_API_VERSION, choose_accel
from vmm.errors import AccelUnavailable

from ..resources.cgroups import V1_CONTROLLERS, V2_CONTROLLERS
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

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_QEMU = (7, 2)  # the release kata-py is built and tested on (Debian bookworm's)
MIN_CONTAINERD = (1, 6)  # the oldest release line CI runs
SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path less its NUL)
# the longest socket path below the state dir: a CRI sandbox's agent socket (shim/manager.py)
LONGEST_SOCKET = "/sandboxes/" + "x" * 24 + "/agent.sock"
MIB = 1 << 20
STATE_DIR_FAIL, STATE_DIR_WARN = 1 * MIB, 16 * MIB
GUEST_CACHE_WARN = 1024 * MIB  # a guest build writes ~400 MB (base tree + image) next to the last ones
BUILD_GUEST = "python3 packaging/guest/build_guest.py (in a kata-py checkout)"
ADD_RUNTIME = ("add the kata-py runtime to containerd's config (README, 'Using it with containerd'; "
               "packaging/containerd/kata-py.toml) and restart containerd")
TCG_COST = ("guest code is emulated: a cold boot takes ~10 s instead of ~1 s, CPU-bound work runs several "
            "times slower, and hot-added vCPUs cannot be unplugged (single-threaded TCG)")
KVM_FIX = ("for KVM: a host with VT-x/AMD-V and kvm_intel/kvm_amd loaded (on a VM: nested virtualization), "
           "not kvm_pvm")


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # ok | warn | FAIL
    found: str
    fix: str = ""


Check = Callable[[HostFacts], CheckResult]


def run_checks(facts: HostFacts) -> list[CheckResult]:
    """Every check, in report order; a check that raises is reported as a FAIL, never propagated."""
    results = []
    for name, check in CHECKS:
        try:
            results.append(check(facts))
        except Exception as exc:
            results.append(CheckResult(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                                       "report this as a kata-py bug"))
    for d in facts.dirs:
        try:
            results.append(check_dir(d, facts))
        except Exception as exc:
            results.append(CheckResult("dir", FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                                       "report this as a kata-py bug"))
    return results


def host_ok(results: list[CheckResult]) -> bool:
    return all(r.status != FAIL for r in results)


def _probe_failed(name: str, fact: ProbeFailed, f: HostFacts | None = None) -> CheckResult:
    if f is not None and f.shim_code_error:  # the probe used the shim's own modules
        return CheckResult(name, FAIL, f"cannot tell while the shim's code does not import ({fact.error})",
                           "see shim-code")
    return CheckResult(name, FAIL, f"could not look: {fact.error}", "report this as a kata-py bug")


# ---------------------------------------------------------------------------------------- checks


def check_config(f: HostFacts) -> CheckResult:
    if f.config_error:
        return CheckResult("config", FAIL, f.config_error,
                           "fix the file (every key is optional; README, 'Using it with containerd')")
    return CheckResult("config", OK, f.config.source)


def check_shim_code(f: HostFacts) -> CheckResult:
    s = f.shim_binary if isinstance(f.shim_binary, ShimBinaryFacts) else None
    if f.shim_code_error:
        return CheckResult("shim-code", FAIL, f"the shim daemon's modules do not import under {sys.executable}: "
                           f"{f.shim_code_error}", "reinstall kata-py with its dependencies (`pip install .` in "
                           "a checkout) into the Python its binary runs")
    if s and s.interpreter and os.path.realpath(s.interpreter) != os.path.realpath(sys.executable):
        return CheckResult("shim-code", WARN, f"imports under {sys.executable}, but {s.name} runs {s.interpreter}",
                           f"check that Python too: {s.interpreter} -m shim.cli check")
    return CheckResult("shim-code", OK, f"shim.daemon imports under {sys.executable}")


def check_root(f: HostFacts) -> CheckResult:
    if f.euid == 0:
        return CheckResult("root", OK, "running as root")
    return CheckResult("root", FAIL, f"running as uid {f.euid}: containerd runs shims as root, and QEMU's "
                       "taps, mounts and cgroups need it; the checks below may read less than root would",
                       "run kata-py (and this check) as root")


def check_kvm(f: HostFacts) -> CheckResult:
    if isinstance(f.kvm, ProbeFailed):
        return _probe_failed("kvm", f.kvm)
    k: KvmFacts = f.kvm
    seen = _kvm_seen(k)
    auto = choose_accel("auto", k.probe)  # vmm.accel's own verdict on this KVM
    fix = KVM_FIX
    if not k.probe.opens and "Permission denied" in k.probe.error:
        fix = "run as root (or give this user /dev/kvm, e.g. the kvm group)"
    if k.requested == "tcg":
        usable = auto.name == "kvm" and k.create_vm_error is None
        return CheckResult("kvm", WARN, f"TCG (configured: accel = \"tcg\"{'; ' + seen if seen else ''}): {TCG_COST}",
                           'set [hypervisor] accel = "auto": KVM is usable' if usable else fix)
    try:
        choice = choose_accel(k.requested, k.probe)  # type: ignore[arg-type]  # exactly the shim's decision
    except AccelUnavailable as exc:
        return CheckResult("kvm", FAIL, f"{exc}" + (f" ({seen})" if seen else ""),
                           f'set [hypervisor] accel = "auto" (TCG fallback) or fix KVM: {fix}')
    if choice.name == "kvm":
        if k.create_vm_error:
            return CheckResult("kvm", FAIL, f"KVM_CREATE_VM failed ({k.create_vm_error}), yet the shim chooses KVM "
                               f"(it asks only for the API version): QEMU will fail ({seen})",
                               f'set [hypervisor] accel = "tcg", or fix KVM: {KVM_FIX}')
        return CheckResult("kvm", OK, f"KVM ({seen})")
    return CheckResult("kvm", WARN, f"TCG fallback: {choice.reason}" + (f" ({seen})" if seen else "") +
                       f"; {TCG_COST}", fix)


def _kvm_seen(k: KvmFacts) -> str:
    """What the probe saw beyond vmm.accel's reason (which already says when /dev/kvm does not open)."""
    p = k.probe
    if not p.opens:
        parts = []
    else:
        parts = ["/dev/kvm opens", f"API version {p.api_version}" if p.api_version is not None else p.error]
        if p.api_version == KVM_API_VERSION:
            parts.append("KVM_CREATE_VM ok" if k.create_vm_error is None else
                         f"KVM_CREATE_VM failed: {k.create_vm_error}" if k.create_vm_error else "KVM_CREATE_VM not tried")
    if p.pvm:
        parts.append("kvm_pvm loaded")
    return ", ".join(parts)


def check_vsock(f: HostFacts) -> CheckResult:
    if isinstance(f.vsock, ProbeFailed):
        return _probe_failed("vsock", f.vsock, f)
    v: VsockFacts = f.vsock
    if v.exists:
        return CheckResult("vsock", OK, f"{v.device}: the agent channel is vsock (VM templates are not used: "
                           "a clone would keep its template's guest CID)")
    return CheckResult("vsock", OK, f"no {v.device}: the agent channel is virtio-serial (fine)")


def check_qemu(f: HostFacts) -> CheckResult:
    if isinstance(f.qemu, ProbeFailed):
        return _probe_failed("qemu", f.qemu)
    q: QemuFacts = f.qemu
    if q.path is None:
        return CheckResult("qemu", FAIL, f"{q.binary} not found on PATH", "apt-get install qemu-system-x86")
    if not q.version_line:
        return CheckResult("qemu", FAIL, f"{q.path} --version failed: {q.error}",
                           "reinstall QEMU (apt-get install --reinstall qemu-system-x86)")
    version = parse.parse_version(q.version_line)
    if version is None:
        return CheckResult("qemu", WARN, f"{q.path}: cannot read a version in {q.version_line!r}",
                           f"use QEMU >= {parse.format_version(MIN_QEMU)}")
    if version[:2] < MIN_QEMU:
        return CheckResult("qemu", FAIL, f"{q.path}: QEMU {parse.format_version(version)} is older than "
                           f"{parse.format_version(MIN_QEMU)}", f"install QEMU >= {parse.format_version(MIN_QEMU)} "
                           "(Debian bookworm's qemu-system-x86 is 7.2)")
    return CheckResult("qemu", OK, f"{q.path}: {q.version_line}")


def check_guest(f: HostFacts) -> CheckResult:
    if isinstance(f.guest, ProbeFailed):
        return _probe_failed("guest-image", f.guest, f)
    g: GuestFacts = f.guest
    if not g.resolved:
        return CheckResult("guest-image", FAIL, f"{g.dir} does not exist", f"build it: {BUILD_GUEST}")
    if g.missing:
        return CheckResult("guest-image", FAIL, f"{', '.join(g.missing)} missing in {g.resolved}",
                           f"build it: {BUILD_GUEST}")
    size = sum(g.sizes.values()) / MIB
    if g.manifest is None:
        return CheckResult("guest-image", WARN, f"{g.resolved} ({size:.0f} MiB) has no usable manifest.json "
                           f"({g.manifest_error}): templates are keyed by its files' sizes and times",
                           f"rebuild it: {BUILD_GUEST}")
    kernel = g.manifest.get("kernel_version", "?")
    return CheckResult("guest-image", OK, f"{g.resolved} (hash {g.manifest.get('hash', '?')}, kernel {kernel}, "
                       f"{size:.0f} MiB)")


def check_template(f: HostFacts) -> CheckResult:
    if isinstance(f.template, ProbeFailed):
        return _probe_failed("template", f.template, f)
    t: TemplateFacts = f.template
    if not t.enabled:
        return CheckResult("template", OK, "off ([factory] template = false): every pod boots cold")
    if t.status == "untemplatable":
        return CheckResult("template", OK, f"not used for this VM shape: {t.detail}")
    if t.status == "unkeyed":
        return CheckResult("template", WARN, f"cannot tell which template this VM shape needs: {t.detail}",
                           "fix the failures above, then run `kata-py template build`")
    build = "kata-py template build"
    if t.status == "missing":
        return CheckResult("template", WARN, f"none for this VM shape (key {t.key}) in {t.root}: the first pod "
                           "boots cold and builds it afterwards", build)
    if t.status == "invalid":
        return CheckResult("template", WARN, f"template {t.key} is invalid ({t.detail}): the next pod removes it, "
                           "boots cold and builds a new one", build)
    m = t.meta
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created", 0)))
    return CheckResult("template", OK, f"{t.key} ({m.get('accel', '?')}, {m.get('memory_mib', '?')} MiB, "
                       f"built {created}) in {t.root}")


def check_containerd(f: HostFacts) -> CheckResult:
    if isinstance(f.containerd, ProbeFailed):
        return _probe_failed("containerd", f.containerd)
    c: ContainerdFacts = f.containerd
    if c.path is None:
        return CheckResult("containerd", FAIL, "containerd not found on PATH",
                           f"apt-get install containerd (>= {parse.format_version(MIN_CONTAINERD)})")
    if not c.version_line:
        return CheckResult("containerd", FAIL, f"{c.path} --version failed: {c.error}", "reinstall containerd")
    running = f"running, pid {c.pid}" if c.pid else "none running with this config"
    version = parse.parse_version(c.version_line)
    if version is None:
        return CheckResult("containerd", WARN, f"{c.path}: cannot read a version in {c.version_line!r} ({running})",
                           f"use containerd >= {parse.format_version(MIN_CONTAINERD)}")
    text = f"{c.path}: {parse.format_version(version)} ({running})"
    if version[:2] < MIN_CONTAINERD:
        return CheckResult("containerd", WARN, f"{text}: older than {parse.format_version(MIN_CONTAINERD)}, untested",
                           f"use containerd >= {parse.format_version(MIN_CONTAINERD)}")
    return CheckResult("containerd", OK, text)


def check_containerd_config(f: HostFacts) -> CheckResult:
    name = "containerd-config"
    if isinstance(f.containerd_config, ProbeFailed):
        return _probe_failed(name, f.containerd_config)
    cc: ContainerdConfigFacts = f.containerd_config
    if not cc.exists:
        return CheckResult(name, WARN, f"no {cc.path}: containerd's defaults have no kata-py runtime, so CRI "
                           f"(Kubernetes) cannot select it; `ctr run --runtime {parse.RUNTIME_TYPE}` works", ADD_RUNTIME)
    if cc.error:
        return CheckResult(name, FAIL, f"{cc.path}: {cc.error}: containerd will not start with it",
                           f"fix {cc.path}")
    major = _containerd_major(f.containerd)
    if cc.version not in parse.CRI_PLUGIN:
        return CheckResult(name, FAIL, f"{cc.path}: config version {cc.version!r} is unknown (1, 2 or 3)",
                           "write version = 2 (containerd 1.x) or 3 (2.x)")
    if cc.version == 3 and major is not None and major < 2:
        return CheckResult(name, FAIL, f"{cc.path} is config version 3, which containerd {major}.x does not read",
                           "write it as version 2 (packaging/containerd/kata-py.toml)")
    where = f"{cc.path} (version {cc.version}" + (f", {len(cc.files) - 1} import(s))" if len(cc.files) > 1 else ")")
    good = _good_runtimes(f)
    cri = parse.CRI_PLUGIN[cc.version]
    if cri in cc.disabled_plugins:
        return CheckResult(name, WARN, f"{where} disables the CRI plugin ({cri}): Kubernetes cannot use this "
                           f"containerd; `ctr run --runtime {parse.RUNTIME_TYPE}` works",
                           f"remove {cri!r} from disabled_plugins and add the kata-py runtime, if CRI is wanted")
    if not good:
        ignored = "".join(f"; runtime {r.name!r} in {r.file} sits under plugins.{r.plugin!r}, which a version "
                          f"{cc.version} config does not read" for r in cc.runtimes)
        return CheckResult(name, WARN, f"{where} names no runtime with runtime_type {parse.RUNTIME_TYPE}{ignored}: "
                           f"CRI (Kubernetes) cannot select kata-py; `ctr run --runtime {parse.RUNTIME_TYPE}` works",
                           ADD_RUNTIME)
    broken = [r for r in good if r.config_path and not r.config_path_exists]
    if broken:
        r = broken[0]
        return CheckResult(name, FAIL, f"runtime {r.name!r} ({r.file}) passes ConfigPath {r.config_path}, which "
                           "does not exist: every pod of it fails", f"create {r.config_path} (every key is optional; "
                           "an empty file means the defaults) or remove ConfigPath")
    runtimes = ", ".join(f"{r.name!r}" + (f" ConfigPath={r.config_path}" if r.config_path else "") for r in good)
    other = next((r.config_path for r in good if r.config_path and r.config_path != f.config.source), "")
    if other:
        return CheckResult(name, WARN, f"{where}: runtime {runtimes}; this check read {f.config.source}, not "
                           f"{other}", f"run `kata-py --config {other} check`")
    return CheckResult(name, OK, f"{where}: runtime {runtimes}")


def _good_runtimes(f: HostFacts) -> list[KataRuntime]:
    """The kata-py runtimes containerd reads from its config (under its version's CRI plugin)."""
    cc = f.containerd_config
    if isinstance(cc, ProbeFailed) or not cc.exists or cc.error:
        return []
    return [r for r in cc.runtimes if r.plugin == parse.CRI_PLUGIN.get(cc.version)]


def _containerd_major(c: ContainerdFacts | ProbeFailed) -> int | None:
    if isinstance(c, ProbeFailed):
        return None
    v = parse.parse_version(c.version_line)
    return v[0] if v else None


def check_shim_binary(f: HostFacts) -> CheckResult:
    name = "shim-binary"
    if isinstance(f.shim_binary, ProbeFailed):
        return _probe_failed(name, f.shim_binary)
    s: ShimBinaryFacts = f.shim_binary
    c = f.containerd if isinstance(f.containerd, ContainerdFacts) else None
    source = c.path_source if c else "containerd's PATH"
    named = [r for r in _good_runtimes(f) if r.runtime_path]
    if named:  # containerd runs that file instead of looking the name up
        r = named[0]
        if r.runtime_path_ok:
            return CheckResult(name, OK, f"{r.runtime_path} (runtime_path of runtime {r.name!r})")
        return CheckResult(name, FAIL, f"runtime {r.name!r} names runtime_path {r.runtime_path}, which is not an "
                           "executable file", f"point runtime_path at {s.found or s.elsewhere or s.name}")
    if s.found:
        return CheckResult(name, OK, f"{s.found} (on {source} or next to containerd)")
    install = f"pip install kata-py (or `pip install .` in a checkout) and put {s.name} on containerd's PATH"
    if s.elsewhere:
        text = f"{s.name} is at {s.elsewhere}, which is not on {source} nor next to containerd"
        fix = f"ln -s {s.elsewhere} /usr/local/bin/{s.name}"
        if c is not None and c.pid is None:  # containerd's PATH was assumed
            return CheckResult(name, WARN, f"{text} (containerd started from this shell would find it)", fix)
        return CheckResult(name, FAIL, text, fix)
    return CheckResult(name, FAIL, f"{s.name} not found (not on {source}, nor on this PATH)", install)


def check_cgroups(f: HostFacts) -> CheckResult:
    if isinstance(f.cgroups, ProbeFailed):
        return _probe_failed("cgroups", f.cgroups)
    cg: CgroupFacts = f.cgroups
    kind = f"v{cg.version}" + (f" (hybrid: cgroup2 at {cg.unified_at})" if cg.unified_at else "")
    listed = ", ".join(sorted(cg.controllers)) or "none"
    required = V2_CONTROLLERS if cg.version == 2 else V1_CONTROLLERS  # what shim/resources/cgroups.py writes
    missing = [c for c in required if c not in cg.controllers]
    if missing:
        return CheckResult("cgroups", FAIL, f"{kind}: {', '.join(missing)} missing (have: {listed}): pod sandbox "
                           "cgroups (CPU quota, cpuset) cannot be made", f"enable the {', '.join(missing)} "
                           "controller(s) (v2: in cgroup.subtree_control from the root down; v1: mount the hierarchy)")
    advised = [c for c in ("memory", "pids") if c not in cg.controllers]
    if advised:
        return CheckResult("cgroups", WARN, f"{kind}: {listed}; {', '.join(advised)} missing: containerd and "
                           "kubelet cannot limit pods with it", f"enable the {', '.join(advised)} controller(s)")
    return CheckResult("cgroups", OK, f"{kind}: {listed}")


def check_dir(d: DirFacts | ProbeFailed, f: HostFacts) -> CheckResult:
    if isinstance(d, ProbeFailed):
        return _probe_failed("dir", d)
    state = d.role == "state-dir"
    bad = FAIL if state else WARN  # without a cache pods still run (cold, from an existing guest)
    what = {"state-dir": "[runtime] state_dir", "guest-cache": "$KATA_PY_GUEST_CACHE",
            "template-cache": "[factory] template_dir"}.get(d.role, d.role)
    if d.error:
        return CheckResult(d.role, bad, f"{d.path}: {d.error}", f"remove it or set {what} elsewhere")
    if not d.usable:
        how = "not writable" if d.exists else f"cannot be created ({d.existing} is not writable)"
        return CheckResult(d.role, bad, f"{d.path}: {how}", f"run as root, or set {what} to a writable directory")
    fs = f"{d.fs_type or '?'} at {d.mount_point or '?'}"
    free = f"{d.free_bytes / MIB:,.0f} MiB free"
    where = f"{d.path} ({'exists' if d.exists else 'will be created'}; {fs}; {free})"
    if state and d.fs_type in parse.SHARED_FS:
        return CheckResult(d.role, FAIL, f"{where}: a shared file system; sockets, locks and the pid-named template "
                           "build directories `delete` reaps assume one host owns it",
                           f"set {what} to a local directory (the tmpfs /run is best)")
    if state:
        longest = len(d.path.rstrip("/")) + len(LONGEST_SOCKET)
        if longest > SUN_PATH_MAX:
            return CheckResult(d.role, FAIL, f"{where}: its sandbox sockets would be {longest} bytes long "
                               f"(unix sockets take {SUN_PATH_MAX})", f"set {what} to a path of at most "
                               f"{SUN_PATH_MAX - len(LONGEST_SOCKET)} bytes")
        if d.free_bytes < STATE_DIR_FAIL:
            return CheckResult(d.role, FAIL, f"{where}: full", f"free space on {d.mount_point}")
        if d.free_bytes < STATE_DIR_WARN:
            return CheckResult(d.role, WARN, f"{where}: little room for consoles and sockets",
                               f"free space on {d.mount_point}")
    need = {"guest-cache": GUEST_CACHE_WARN, "template-cache": f.config.hypervisor.default_memory_mib * MIB}
    if d.free_bytes < need.get(d.role, 0):
        why = ("a guest build writes ~400 MB" if d.role == "guest-cache" else
               "a template takes up to [hypervisor] default_memory_mib of disk")
        return CheckResult(d.role, WARN, f"{where}: {why}", f"free space on {d.mount_point}")
    return CheckResult(d.role, OK, where)


CHECKS: list[tuple[str, Check]] = [
    ("config", check_config), ("shim-code", check_shim_code), ("root", check_root), ("kvm", check_kvm), ("vsock", check_vsock),
    ("qemu", check_qemu), ("guest-image", check_guest), ("template", check_template),
    ("containerd", check_containerd), ("containerd-config", check_containerd_config),
    ("shim-binary", check_shim_binary), ("cgroups", check_cgroups),
]
