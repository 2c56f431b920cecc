"""`kata-py check` and `kata-py env` run for real on this machine, as a user runs them (a subprocess),
and compared with what this host is, looked up independently here: /dev/kvm and kvm_pvm, vsock,
QEMU's and containerd's versions, the cgroup version. Nothing is booted: the check only asks."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest

from shim.check.parse import parse_version
from shim.config import load_config
from vmm.accel import choose_accel, probe_kvm

REPO = Path(__file__).resolve().parents[2]
STATUSES = {"ok", "warn", "FAIL"}
NAMES = ["config", "shim-code", "root", "kvm", "vsock", "qemu", "guest-image", "template", "containerd",
         "containerd-config", "shim-binary", "cgroups", "state-dir"]


def kata_py(*args: str, argv0: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = (argv0 or [sys.executable, "-m", "shim.cli"]) + list(args)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def check_json(*args: str) -> tuple[dict, int]:
    out = kata_py(*args, "check", "--json")
    assert out.stderr == "", out.stderr
    return json.loads(out.stdout), out.returncode


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def version_of(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    v = parse_version(out.stdout)
    assert v is not None
    return ".".join(map(str, v))


def assert_well_formed(doc: dict, code: int) -> None:
    assert doc["format_version"] == 1
    names = [c["name"] for c in doc["checks"]]
    assert names[:len(NAMES)] == NAMES
    for c in doc["checks"]:
        assert c["status"] in STATUSES and c["found"], c
        assert c["status"] == "ok" or c["fix"], f"{c['name']}: a problem without a fix"
    failed = any(c["status"] == "FAIL" for c in doc["checks"])
    assert doc["host_ok"] is not failed
    assert code == (1 if failed else 0), "exit 1 exactly when a check failed (warnings allowed)"


def test_check_reports_what_this_host_is() -> None:
    t0 = time.monotonic()
    doc, code = check_json()
    wall = time.monotonic() - t0
    assert_well_formed(doc, code)
    checks = by_name(doc)

    kvm, probe = checks["kvm"], probe_kvm()
    if Path("/sys/module/kvm_pvm").exists():  # this CI host: KVM is there, but only kvm_pvm's
        assert kvm["status"] == "warn" and "TCG fallback" in kvm["found"] and "kvm_pvm" in kvm["found"]
        assert "KVM_CREATE_VM" in kvm["found"]  # it did not stop at the module: it asked KVM itself
    elif choose_accel("auto", probe).name == "tcg":
        assert kvm["status"] == "warn" and "TCG fallback" in kvm["found"]
    else:
        assert kvm["status"] in ("ok", "FAIL") and "KVM_CREATE_VM" in kvm["found"]

    vsock = checks["vsock"]
    assert vsock["status"] == "ok"
    assert ("virtio-serial" in vsock["found"]) is (not os.path.exists("/dev/vhost-vsock"))

    assert (checks["root"]["status"] == "ok") is (os.geteuid() == 0)
    if qemu := shutil.which("qemu-system-x86_64"):
        assert checks["qemu"]["found"].startswith(qemu) and version_of(qemu) in checks["qemu"]["found"]
    else:
        assert checks["qemu"]["status"] == "FAIL"
    if containerd := shutil.which("containerd"):
        assert f": {version_of(containerd)} (" in checks["containerd"]["found"]
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    assert checks["cgroups"]["found"].startswith("v2" if v2 else "v1")
    guest = load_config().guest_dir()
    if (guest / "manifest.json").is_file():
        manifest = json.loads((guest / "manifest.json").read_text())
        assert checks["guest-image"]["status"] == "ok" and manifest["hash"] in checks["guest-image"]["found"]
    # ~0.2-0.5 s on this 2-core machine; the slack is for a loaded CI run, not for a slow probe
    assert doc["elapsed_s"] < 2.0 and wall < 10, (doc["elapsed_s"], wall)


def test_text_report_matches_the_json_one() -> None:
    doc, code = check_json()
    out = kata_py("check")
    assert out.returncode == code
    lines = out.stdout.splitlines()
    problems = sum(c["status"] != "ok" and bool(c["fix"]) for c in doc["checks"])
    assert len(lines) == len(doc["checks"]) + problems + 1
    statuses = [line.split()[0] for line in lines[:-1] if not line.startswith(" ")]
    assert statuses == [c["status"] for c in doc["checks"]]
    assert lines[-1].startswith("this host cannot run" if code else "this host can run")


def test_a_failing_check_exits_1_and_the_rest_are_still_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = tmp_path / "configuration.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/file/state"\n')
    doc, code = check_json("--config", str(config))
    assert_well_formed(doc, code)
    assert code == 1
    state = by_name(doc)["state-dir"]
    assert state["status"] == "FAIL" and "is not a directory" in state["found"] and "state_dir" in state["fix"]
    assert by_name(doc)["config"] == {"name": "config", "status": "ok", "found": str(config), "fix": ""}


def test_a_bad_configuration_is_one_failed_check(tmp_path: Path) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text("[hypervisor]\naccell = 'tcg'\n")
    doc, code = check_json("--config", str(config))
    assert_well_formed(doc, code)
    assert code == 1 and by_name(doc)["config"]["status"] == "FAIL" and "accell" in by_name(doc)["config"]["found"]


def test_the_check_changes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n[factory]\ntemplate_dir = "{tmp_path}/t"\n')
    doc, code = check_json("--config", str(config))
    assert_well_formed(doc, code)
    assert "will be created" in by_name(doc)["state-dir"]["found"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configuration.toml"]


def test_containerd_config_naming_kata_py(tmp_path: Path) -> None:
    kata_config = tmp_path / "configuration.toml"
    kata_config.write_text("")
    containerd_config = tmp_path / "config.toml"
    containerd_config.write_text(textwrap.dedent(f"""\
        version = 2
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-py]
          runtime_type = "io.containerd.kata-py.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-py.options]
            ConfigPath = "{kata_config}"
        """))
    out = kata_py("--config", str(kata_config), "check", "--json", "--containerd-config", str(containerd_config))
    doc = json.loads(out.stdout)
    assert_well_formed(doc, out.returncode)
    cc = by_name(doc)["containerd-config"]
    assert cc["status"] == "ok" and "'kata-py'" in cc["found"] and str(kata_config) in cc["found"]
    kata_config.unlink()  # the ConfigPath containerd would pass is gone: every pod would fail
    out = kata_py("--config", str(tmp_path / "other.toml"), "check", "--json",
                  "--containerd-config", str(containerd_config))
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and by_name(doc)["containerd-config"]["status"] == "FAIL"


def test_env_describes_runtime_and_host() -> None:
    out = kata_py("env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format_version"] == 1
    assert info["kata_py"]["version"] == metadata.version("kata-py")
    assert info["python"] == {"version": platform.python_version(), "executable": sys.executable}
    assert info["libraries"]["trio"] == metadata.version("trio")
    assert info["libraries"]["grpcio"] == metadata.version("grpcio")
    config = load_config()
    assert info["config"]["path"] == config.source
    assert info["config"]["values"]["runtime"]["state_dir"] == config.runtime.state_dir
    choice = choose_accel(config.hypervisor.accel, probe_kvm())  # type: ignore[arg-type]
    assert (info["accel"]["name"], info["accel"]["reason"]) == (choice.name, choice.reason)
    assert info["vsock"]["available"] is os.path.exists("/dev/vhost-vsock")
    if qemu := shutil.which("qemu-system-x86_64"):
        assert info["qemu"]["path"] == qemu and info["qemu"]["version"] == version_of(qemu)
    if containerd := shutil.which("containerd"):
        assert info["containerd"]["version"] == version_of(containerd)
    assert info["cgroup"]["version"] == (2 if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else 1)
    manifest = config.guest_dir() / "manifest.json"
    if manifest.is_file():
        assert info["guest"]["hash"] == json.loads(manifest.read_text())["hash"]
        assert info["guest"]["path"] == str(config.guest_dir().resolve())
    text = kata_py("env")
    assert text.returncode == 0 and "[accel]\n  requested: " in text.stdout and f"name: {choice.name}" in text.stdout


def test_the_installed_entry_point_runs_the_same_check() -> None:
    exe = shutil.which("kata-py")
    if exe is None:
        pytest.skip("kata-py is not installed on PATH")
    out = kata_py("check", "--json", argv0=[exe])
    doc = json.loads(out.stdout)
    assert_well_formed(doc, out.returncode)
