"""`kata-py check` / `env` logic from made-up host facts: each check's verdict and fix, the report
never dying of one check, the parsers the probe uses, and the JSON shapes."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import tomllib
from pathlib import Path

import pytest

from shim.check import checks, parse, report
from shim.check.checks import FAIL, OK, WARN, CheckResult, host_ok, run_checks
from shim.check.facts import (
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
from shim.check.probe import Probe
from shim.config import Config, HypervisorConfig, RuntimeConfig
from vmm.accel import KvmProbe

GOOD_KVM = KvmProbe(opens=True, api_version=12, pvm=False)
PVM = KvmProbe(opens=True, api_version=12, pvm=True)
CFG_SOURCE = "/etc/kata-py/configuration.toml"
RUNTIME = KataRuntime(file="/etc/containerd/config.toml", plugin="io.containerd.grpc.v1.cri", name="kata-py",
                      config_path=CFG_SOURCE)


def state_dir(**kw) -> DirFacts:
    base = dict(role="state-dir", path="/run/kata-py", exists=True, usable=True, existing="/run/kata-py",
                free_bytes=1 << 30, fs_type="tmpfs", mount_point="/run")
    return DirFacts(**{**base, **kw})


def cache_dir(role: str, **kw) -> DirFacts:
    base = dict(role=role, path=f"/var/cache/kata-py/{role}", exists=True, usable=True, existing="/var/cache",
                free_bytes=50 << 30, fs_type="ext4", mount_point="/")
    return DirFacts(**{**base, **kw})


def healthy(**kw) -> HostFacts:
    """A host where everything is fine (KVM, vsock absent, kata-py configured in containerd 1.6)."""
    base = dict(
        euid=0, config=Config(source=CFG_SOURCE), config_error="", shim_code_error="",
        kvm=KvmFacts(requested="auto", probe=GOOD_KVM, create_vm_error=None),
        vsock=VsockFacts(device="/dev/vhost-vsock", exists=False),
        qemu=QemuFacts(binary="qemu-system-x86_64", path="/usr/bin/qemu-system-x86_64",
                       version_line="QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
        guest=GuestFacts(dir="/var/cache/kata-py/guest/current", resolved="/var/cache/kata-py/guest/abc", missing=(),
                         manifest={"hash": "abc", "kernel_version": "6.1.0-57-amd64"},
                         sizes={"vmlinux": 66 << 20, "initrd.img": 2 << 20, "rootfs.erofs": 150 << 20}),
        template=TemplateFacts(enabled=True, root="/var/cache/kata-py/templates", key="k" * 32, status="valid",
                               meta={"accel": "kvm", "memory_mib": 512, "created": 0}),
        containerd=ContainerdFacts(path="/usr/bin/containerd", pid=42, search_path="/usr/local/bin:/usr/bin",
                                   path_source="PATH of containerd pid 42",
                                   version_line="containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1"),
        containerd_config=ContainerdConfigFacts(path="/etc/containerd/config.toml", exists=True, version=2,
                                                files=("/etc/containerd/config.toml",), runtimes=(RUNTIME,)),
        shim_binary=ShimBinaryFacts(name="containerd-shim-kata-py-v2", found="/usr/local/bin/containerd-shim-kata-py-v2",
                                    elsewhere=None),
        cgroups=CgroupFacts(version=2, controllers=frozenset({"cpu", "cpuset", "memory", "pids", "io"})),
        dirs=(state_dir(), cache_dir("guest-cache"), cache_dir("template-cache")),
    )
    return HostFacts(**{**base, **kw})


def result(facts: HostFacts, name: str) -> CheckResult:
    return next(r for r in run_checks(facts) if r.name == name)


def test_a_healthy_host_passes_every_check() -> None:
    results = run_checks(healthy())
    assert [r.status for r in results] == [OK] * len(results), [r for r in results if r.status != OK]
    assert host_ok(results)
    names = [r.name for r in results]
    assert names == ["config", "shim-code", "root", "kvm", "vsock", "qemu", "guest-image", "template", "containerd",
                     "containerd-config", "shim-binary", "cgroups", "state-dir", "guest-cache", "template-cache"]


# ---- KVM ------------------------------------------------------------------------------------------


def test_kvm_usable() -> None:
    r = result(healthy(), "kvm")
    assert r.status == OK and "KVM_CREATE_VM ok" in r.found and "API version 12" in r.found


def test_kvm_pvm_falls_back_to_tcg_with_its_cost() -> None:
    r = result(healthy(kvm=KvmFacts("auto", PVM, None)), "kvm")
    assert r.status == WARN
    assert "TCG fallback" in r.found and "kvm_pvm" in r.found and "cold boot" in r.found
    assert "kvm_pvm" in r.fix


def test_no_kvm_device_is_a_warning_not_a_failure() -> None:
    probe = KvmProbe(opens=False, api_version=None, pvm=False, error="No such file or directory")
    r = result(healthy(kvm=KvmFacts("auto", probe, "")), "kvm")
    assert r.status == WARN and "No such file" in r.found and "KVM_CREATE_VM" not in r.found
    assert r.found.count("No such file") == 1 and "VT-x" in r.fix
    denied = KvmProbe(opens=False, api_version=None, pvm=False, error="[Errno 13] Permission denied: '/dev/kvm'")
    assert "kvm group" in result(healthy(kvm=KvmFacts("auto", denied, "")), "kvm").fix


def test_kvm_requested_on_a_pvm_host_fails_and_names_the_fallback() -> None:
    facts = healthy(kvm=KvmFacts("kvm", PVM, None))
    r = result(facts, "kvm")
    assert r.status == FAIL and 'accel = "auto"' in r.fix
    assert not host_ok(run_checks(facts))


def test_kvm_that_cannot_create_a_vm_fails_because_the_shim_would_still_choose_it() -> None:
    r = result(healthy(kvm=KvmFacts("auto", GOOD_KVM, "Operation not permitted")), "kvm")
    assert r.status == FAIL and "KVM_CREATE_VM failed" in r.found and 'accel = "tcg"' in r.fix


def test_tcg_configured_on_a_kvm_host_suggests_auto() -> None:
    r = result(healthy(kvm=KvmFacts("tcg", GOOD_KVM, None)), "kvm")
    assert r.status == WARN and 'accel = "auto"' in r.fix


# ---- vsock, QEMU, guest, template -------------------------------------------------------------------


def test_vsock_either_way_is_fine() -> None:
    assert "virtio-serial" in result(healthy(), "vsock").found
    r = result(healthy(vsock=VsockFacts("/dev/vhost-vsock", True)), "vsock")
    assert r.status == OK and "vsock" in r.found and "templates are not used" in r.found


@pytest.mark.parametrize(("qemu", "status", "text"), [
    (QemuFacts("qemu-system-x86_64", None, "", "not found"), FAIL, "not found"),
    (QemuFacts("qemu-system-x86_64", "/q", "", "exit 1"), FAIL, "--version failed"),
    (QemuFacts("qemu-system-x86_64", "/q", "QEMU emulator version 7.1.0"), FAIL, "older than 7.2"),
    (QemuFacts("qemu-system-x86_64", "/q", "QEMU emulator version 8.2.2 (Debian)"), OK, "8.2.2"),
    (QemuFacts("qemu-system-x86_64", "/q", "something else"), WARN, "cannot read a version"),
])
def test_qemu(qemu: QemuFacts, status: str, text: str) -> None:
    r = result(healthy(qemu=qemu), "qemu")
    assert r.status == status and text in r.found
    assert status == OK or r.fix


def test_guest_image_problems_name_the_build_command() -> None:
    gone = GuestFacts(dir="/g/current", resolved="", missing=("vmlinux", "initrd.img", "rootfs.erofs"), manifest=None)
    r = result(healthy(guest=gone), "guest-image")
    assert r.status == FAIL and "does not exist" in r.found and "build_guest.py" in r.fix
    partial = dataclasses.replace(gone, resolved="/g/x", missing=("rootfs.erofs",))
    r = result(healthy(guest=partial), "guest-image")
    assert r.status == FAIL and "rootfs.erofs missing" in r.found
    no_manifest = dataclasses.replace(gone, resolved="/g/x", missing=(), manifest_error="No such file")
    assert result(healthy(guest=no_manifest), "guest-image").status == WARN


@pytest.mark.parametrize(("template", "status", "text"), [
    (TemplateFacts(True, "/t", key="abc", status="missing"), WARN, "boots cold"),
    (TemplateFacts(True, "/t", key="abc", status="invalid", detail="RAM file digest mismatch"), WARN, "digest"),
    (TemplateFacts(True, "/t", status="unkeyed", detail="no guest image"), WARN, "no guest image"),
    (TemplateFacts(True, "/t", status="untemplatable", detail="agent over vsock"), OK, "vsock"),
    (TemplateFacts(False, "/t"), OK, "template = false"),
])
def test_template(template: TemplateFacts, status: str, text: str) -> None:
    r = result(healthy(template=template), "template")
    assert r.status == status and text in r.found
    if template.status in ("missing", "invalid", "unkeyed") and template.enabled:
        assert "kata-py template build" in r.fix


# ---- containerd ------------------------------------------------------------------------------------


def test_containerd_versions() -> None:
    c = healthy().containerd
    assert isinstance(c, ContainerdFacts)
    r = result(healthy(containerd=dataclasses.replace(c, version_line="containerd github.com/containerd/containerd/v2 "
                                                                     "v2.1.9 abc")), "containerd")
    assert r.status == OK and ": 2.1.9 (running, pid 42)" in r.found
    assert result(healthy(containerd=dataclasses.replace(c, version_line="containerd x v1.5.9 x")),
                  "containerd").status == WARN
    r = result(healthy(containerd=dataclasses.replace(c, path=None)), "containerd")
    assert r.status == FAIL and "apt-get install containerd" in r.fix


def cc(**kw) -> ContainerdConfigFacts:
    c = healthy().containerd_config
    assert isinstance(c, ContainerdConfigFacts)
    return dataclasses.replace(c, **kw)


def with_containerd(version_line: str) -> ContainerdFacts:
    c = healthy().containerd
    assert isinstance(c, ContainerdFacts)
    return dataclasses.replace(c, version_line=version_line)


def test_containerd_config_without_kata_py_only_warns_since_ctr_still_works() -> None:
    r = result(healthy(containerd_config=cc(runtimes=())), "containerd-config")
    assert r.status == WARN and "ctr run --runtime io.containerd.kata-py.v2" in r.found and "kata-py.toml" in r.fix
    r = result(healthy(containerd_config=cc(exists=False, runtimes=())), "containerd-config")
    assert r.status == WARN and "no /etc/containerd/config.toml" in r.found


def test_a_containerd_without_cri_is_named() -> None:
    r = result(healthy(containerd_config=cc(disabled_plugins=("io.containerd.grpc.v1.cri",))), "containerd-config")
    assert r.status == WARN and "disables the CRI plugin" in r.found


def test_containerd_config_that_does_not_parse_fails() -> None:
    r = result(healthy(containerd_config=cc(error="Expected '=' (line 3)")), "containerd-config")
    assert r.status == FAIL and "will not start" in r.found


def test_config_version_3_needs_containerd_2() -> None:
    v3 = cc(version=3, runtimes=(dataclasses.replace(RUNTIME, plugin="io.containerd.cri.v1.runtime"),))
    assert result(healthy(containerd_config=v3), "containerd-config").status == FAIL
    r = result(healthy(containerd_config=v3, containerd=with_containerd("containerd x v2.1.9 y")), "containerd-config")
    assert r.status == OK and "version 3" in r.found and "'kata-py'" in r.found


def test_a_runtime_under_the_wrong_plugin_for_the_config_version_is_named() -> None:
    v3 = cc(version=3)  # RUNTIME sits under the version-2 plugin name
    r = result(healthy(containerd_config=v3, containerd=with_containerd("containerd x v2.1.9 y")), "containerd-config")
    assert r.status == WARN and "io.containerd.grpc.v1.cri" in r.found and "does not read" in r.found


def test_a_config_path_that_does_not_exist_fails_every_pod() -> None:
    broken = dataclasses.replace(RUNTIME, config_path_exists=False)
    r = result(healthy(containerd_config=cc(runtimes=(broken,))), "containerd-config")
    assert r.status == FAIL and CFG_SOURCE in r.found and "remove ConfigPath" in r.fix


def test_a_config_path_other_than_the_one_checked_is_pointed_out() -> None:
    r = result(healthy(config=Config(source="defaults")), "containerd-config")
    assert r.status == WARN and f"kata-py --config {CFG_SOURCE} check" in r.fix


def test_shim_binary() -> None:
    s = ShimBinaryFacts(name="containerd-shim-kata-py-v2", found=None, elsewhere="/opt/venv/bin/containerd-shim-kata-py-v2")
    r = result(healthy(shim_binary=s), "shim-binary")  # containerd runs: its PATH is known
    assert r.status == FAIL and r.fix == f"ln -s {s.elsewhere} /usr/local/bin/{s.name}"
    not_running = dataclasses.replace(with_containerd("containerd x 1.6.20 y"), pid=None)
    assert result(healthy(shim_binary=s, containerd=not_running), "shim-binary").status == WARN
    nowhere = dataclasses.replace(s, elsewhere=None)
    assert result(healthy(shim_binary=nowhere), "shim-binary").status == FAIL


def test_runtime_path_replaces_the_path_lookup() -> None:
    named = dataclasses.replace(RUNTIME, runtime_path="/opt/kata-py/shim")
    nowhere = ShimBinaryFacts(name="containerd-shim-kata-py-v2", found=None, elsewhere=None)
    r = result(healthy(containerd_config=cc(runtimes=(named,)), shim_binary=nowhere), "shim-binary")
    assert r.status == OK and "runtime_path" in r.found
    bad = dataclasses.replace(named, runtime_path_ok=False)
    assert result(healthy(containerd_config=cc(runtimes=(bad,))), "shim-binary").status == FAIL


# ---- cgroups, dirs, root, config, shim code ---------------------------------------------------------------


def test_cgroups() -> None:
    r = result(healthy(cgroups=CgroupFacts(2, frozenset({"cpu", "memory", "pids"}))), "cgroups")
    assert r.status == FAIL and "cpuset missing" in r.found
    r = result(healthy(cgroups=CgroupFacts(1, frozenset({"cpu", "cpuset", "memory"}), "/sys/fs/cgroup/unified")),
               "cgroups")
    assert r.status == WARN and "pids" in r.found and "hybrid" in r.found


@pytest.mark.parametrize(("d", "status", "text"), [
    (state_dir(fs_type="nfs4", mount_point="/run"), FAIL, "shared file system"),
    (state_dir(usable=False, exists=False, existing="/"), FAIL, "cannot be created"),
    (state_dir(error="not a directory"), FAIL, "not a directory"),
    (state_dir(path="/" + "x" * 70), FAIL, "bytes long"),
    (state_dir(free_bytes=4 << 20), WARN, "little room"),
    (state_dir(free_bytes=0), FAIL, "full"),
    (cache_dir("template-cache", usable=False), WARN, "not writable"),
    (cache_dir("template-cache", fs_type="nfs4"), OK, "nfs4"),  # slow, but only the state dir must be local
    (cache_dir("template-cache", free_bytes=100 << 20), WARN, "default_memory_mib"),
    (cache_dir("guest-cache", free_bytes=500 << 20), WARN, "guest build"),
])
def test_dirs(d: DirFacts, status: str, text: str) -> None:
    r = result(healthy(dirs=(d,)), d.role)
    assert r.status == status and text in r.found
    assert status == OK or r.fix


def test_not_root_fails() -> None:
    r = result(healthy(euid=1000), "root")
    assert r.status == FAIL and "uid 1000" in r.found


def test_a_bad_config_fails_but_the_other_checks_still_run() -> None:
    results = run_checks(healthy(config_error="config x: unknown key 'acel'"))
    assert results[0].status == FAIL and "acel" in results[0].found
    assert len(results) == len(run_checks(healthy()))


def test_shim_code_that_does_not_import_fails_and_explains_the_probes_it_broke() -> None:
    facts = healthy(shim_code_error="ModuleNotFoundError: No module named 'x'",
                    guest=ProbeFailed("ModuleNotFoundError: No module named 'x'"))
    assert result(facts, "shim-code").status == FAIL
    r = result(facts, "guest-image")
    assert r.status == FAIL and r.fix == "see shim-code"


def test_a_shim_binary_on_another_python_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    s = ShimBinaryFacts(name="containerd-shim-kata-py-v2", found="/usr/local/bin/x", elsewhere=None,
                        interpreter="/opt/other/bin/python3")
    r = result(healthy(shim_binary=s), "shim-code")
    assert r.status == WARN and "/opt/other/bin/python3 -m shim.cli check" in r.fix


# ---- robustness -------------------------------------------------------------------------------------------


def test_a_failed_probe_is_a_failure_not_a_crash() -> None:
    results = run_checks(healthy(kvm=ProbeFailed("PermissionError: x"), cgroups=ProbeFailed("OSError: y"),
                                 dirs=(ProbeFailed("OSError: z"),)))
    by_name = {r.name: r for r in results}
    assert by_name["kvm"].status == FAIL and "PermissionError" in by_name["kvm"].found
    assert by_name["cgroups"].status == FAIL and by_name["dir"].status == FAIL


def test_a_check_that_raises_is_reported_and_the_rest_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(facts: HostFacts) -> CheckResult:
        raise RuntimeError("surprise")

    monkeypatch.setattr(checks, "CHECKS", [("boom", boom), *checks.CHECKS])
    results = run_checks(healthy())
    assert results[0] == CheckResult("boom", FAIL, "the check itself failed: RuntimeError: surprise",
                                     "report this as a kata-py bug")
    assert all(r.status == OK for r in results[1:])


# ---- parsers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "version"), [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", (7, 2, 22)),
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", (1, 6, 20)),
    ("containerd github.com/containerd/containerd/v2 v2.1.9 ffd4f5b", (2, 1, 9)),
    ("containerd containerd.io 1.7.24 88bf19b", (1, 7, 24)),
    ("QEMU emulator version 8.2", (8, 2, 0)),
    ("no version here", None),
])
def test_parse_version(line: str, version: tuple[int, int, int] | None) -> None:
    assert parse.parse_version(line) == version


MOUNTINFO = textwrap.dedent("""\
    22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
    25 22 0:21 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=400000k,mode=755
    30 22 0:40 / /mnt/with\\040space rw - nfs4 srv:/export rw,vers=4.2
    31 22 0:41 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
    32 31 0:42 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
    33 31 0:43 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
    34 31 0:44 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
    garbage line
""")


def test_mountinfo_and_the_mount_a_path_is_on() -> None:
    mounts = parse.parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 7
    assert parse.mount_of("/run/kata-py", mounts).fs_type == "tmpfs"  # type: ignore[union-attr]
    assert parse.mount_of("/runner", mounts).fs_type == "ext4"  # type: ignore[union-attr]  # not /run
    assert parse.mount_of("/mnt/with space/x", mounts).fs_type == "nfs4"  # type: ignore[union-attr]
    assert parse.unified_mount(mounts, "/sys/fs/cgroup") == "/sys/fs/cgroup/unified"


def test_v1_controllers_are_those_enabled_and_mounted() -> None:
    proc = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t2\t1\t1\ncpuacct\t2\t1\t1\ncpuset\t0\t1\t1\nrdma\t0\t1\t0\n"
    enabled = parse.proc_cgroups_enabled(proc)
    assert enabled == {"cpu", "cpuacct", "cpuset"}
    assert parse.v1_controllers(parse.parse_mountinfo(MOUNTINFO), enabled) == {"cpu", "cpuacct"}


V2_CONFIG = """
version = 2
imports = ["config.d/*.toml", "/abs/x.toml"]
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vm]
  runtime_type = "io.containerd.kata-py.v2"
  runtime_path = "/opt/shim"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vm.options]
    configpath = "/etc/kata-py/vm.toml"
"""


@pytest.mark.parametrize(("args", "path"), [
    ([], ""), (["--config", "/tmp/c.toml"], "/tmp/c.toml"), (["-c", "/x"], "/x"), (["--config=/y", "-l", "debug"], "/y"),
    (["--log-level", "debug"], ""),
])
def test_the_config_a_containerd_command_line_names(args: list[str], path: str) -> None:
    assert parse.containerd_config_arg(args) == path


def test_kata_runtimes_and_imports_of_a_containerd_config() -> None:
    doc = tomllib.loads(V2_CONFIG)
    assert parse.config_version(doc) == 2
    assert parse.config_imports(doc, "/etc/containerd/config.toml") == ["/etc/containerd/config.d/*.toml", "/abs/x.toml"]
    assert parse.kata_runtimes(doc, "f") == [KataRuntime(file="f", plugin="io.containerd.grpc.v1.cri", name="vm",
                                                         config_path="/etc/kata-py/vm.toml", runtime_path="/opt/shim")]
    assert parse.config_version({}) == 1 and parse.kata_runtimes({"plugins": {"x": 1}}, "f") == []


def test_a_containerd_config_of_the_wrong_shape_finds_nothing_rather_than_failing() -> None:
    assert parse.kata_runtimes({"plugins": {"cri": {"containerd": "not a table"}}}, "f") == []
    assert parse.kata_runtimes({"plugins": {"cri": {"containerd": {"runtimes": ["vm"]}}}}, "f") == []
    odd = {"runtime_type": parse.RUNTIME_TYPE, "options": "not a table", "runtime_path": 7}
    assert parse.kata_runtimes({"plugins": {"cri": {"containerd": {"runtimes": {"vm": odd}}}}}, "f") == [
        KataRuntime(file="f", plugin="cri", name="vm", config_path="", runtime_path="")]


def test_the_shipped_containerd_snippet_configures_kata_py() -> None:
    snippet = Path(__file__).parents[2] / "packaging/containerd/kata-py.toml"
    doc = tomllib.loads(snippet.read_text())
    found = parse.kata_runtimes(doc, str(snippet))
    assert [(r.plugin, r.name) for r in found] == [(parse.CRI_PLUGIN[parse.config_version(doc)], "kata-py")]


def test_probe_reads_a_containerd_config_with_its_imports(tmp_path: Path) -> None:
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.toml").write_text('version = 2\nimports = ["config.d/*.toml"]\n')
    kata = tmp_path / "kata.toml"
    kata.write_text("")
    (tmp_path / "config.d" / "kata-py.toml").write_text(textwrap.dedent(f"""\
        version = 2
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-py]
          runtime_type = "io.containerd.kata-py.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-py.options]
            ConfigPath = "{kata}"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.other]
          runtime_type = "io.containerd.kata-py.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.other.options]
            ConfigPath = "{tmp_path}/missing.toml"
        """))
    facts = Probe(Config(), containerd_config=str(tmp_path / "config.toml")).containerd_config()
    assert facts.version == 2 and len(facts.files) == 2
    assert [(r.name, r.config_path_exists) for r in facts.runtimes] == [("kata-py", True), ("other", False)]
    (tmp_path / "config.d" / "bad.toml").write_text("version = = 2")
    assert "bad.toml" in Probe(Config(), containerd_config=str(tmp_path / "config.toml")).containerd_config().error


def test_probe_of_dirs(tmp_path: Path) -> None:
    probe = Probe(Config())
    new = probe.directory("state-dir", tmp_path / "a" / "b")
    assert not new.exists and new.usable and new.existing == str(tmp_path) and new.free_bytes > 0 and new.fs_type
    (tmp_path / "file").write_text("")
    blocked = probe.directory("state-dir", tmp_path / "file" / "state")
    assert not blocked.usable and "is not a directory" in blocked.error


# ---- report shapes -----------------------------------------------------------------------------------------


def test_text_report_one_line_per_check_a_fix_line_per_problem_and_a_verdict() -> None:
    results = run_checks(healthy(kvm=KvmFacts("auto", PVM, None), euid=1000))
    lines = report.check_text(results, 0.25).splitlines()
    assert len(lines) == len(results) + 2 + 1  # two problems, each with its fix; the verdict
    assert lines[0].split()[:2] == ["ok", "config"]
    assert any(line.startswith("warn  kvm ") for line in lines)
    assert any(line.startswith("FAIL  root ") for line in lines)
    assert lines[-1].startswith("this host cannot run kata-py pods: 1 check(s) failed (root)")


def test_json_report() -> None:
    results = run_checks(healthy(kvm=KvmFacts("auto", PVM, None)))
    doc = json.loads(report.check_json(results, 0.5, {"kata-py": "0.1.0"}))
    assert doc["format_version"] == report.FORMAT_VERSION and doc["host_ok"] is True
    assert doc["counts"] == {"ok": len(results) - 1, "warn": 1, "FAIL": 0}
    assert set(doc["checks"][0]) == {"name", "status", "found", "fix"}


def test_env_description() -> None:
    facts = healthy(config=Config(hypervisor=HypervisorConfig(accel="auto"), runtime=RuntimeConfig(state_dir="/s"),
                                  source="/c.toml"), kvm=KvmFacts("auto", PVM, None), qemu=ProbeFailed("OSError: x"))
    info = report.env_info(facts, {"kata-py": "0.1.0", "python": "3.11.2", "libraries": {"trio": "0.22.2"}})
    assert info["format_version"] == report.FORMAT_VERSION
    assert info["config"]["path"] == "/c.toml" and info["config"]["values"]["runtime"]["state_dir"] == "/s"
    assert info["accel"]["name"] == "tcg" and "kvm_pvm" in info["accel"]["reason"]
    assert info["qemu"] == {"error": "OSError: x"}
    assert info["guest"]["hash"] == "abc" and info["vsock"]["agent_channel"] == "virtio-serial"
    assert info["containerd"]["version"] == "1.6.20" and info["cgroup"]["version"] == 2
    json.dumps(info)  # serialisable as it is
    text = report.env_text(info)
    assert "[accel]\n  requested: auto\n  name: tcg" in text and "values.runtime.state_dir: /s" in text
