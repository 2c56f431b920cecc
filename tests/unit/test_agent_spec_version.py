"""The guest spec's ociVersion fits the guest runtime (containerd 1.7/2.x write 1.2.x; crun 1.8.1 refuses it)."""

from __future__ import annotations

import pytest

from agent.spec import fit_oci_version, guest_spec, runtime_spec_version

CRUN_1_8_1 = "crun version 1.8.1\ncommit: f8a096be060b22ccd3d5f3ebe44108517fbf6c30\nrundir: /run/crun\nspec: 1.0.0\n" \
             "+SYSTEMD +SELINUX +APPARMOR +CAP +SECCOMP +EBPF +CRIU +YAJL"
RUNC_1_1_5 = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\ngo: go1.19.8\nlibseccomp: 2.5.4"


def test_runtime_spec_version_from_version_output() -> None:
    assert runtime_spec_version(CRUN_1_8_1) == "1.0.0"
    assert runtime_spec_version(RUNC_1_1_5) == "1.0.2-dev"
    assert runtime_spec_version("crun version 1.8.1") == ""
    assert runtime_spec_version("spec: not-a-version") == ""


@pytest.mark.parametrize(("version", "runtime", "expected"), [
    ("1.2.1", "1.0.0", "1.0.0"),  # containerd 2.1 -> bookworm's crun
    ("1.2.0", "1.0.2-dev", "1.0.2-dev"),  # containerd 1.7 -> bookworm's runc
    ("1.1.0", "1.0.0", "1.0.0"),
    ("1.0.2-dev", "1.0.0", "1.0.2-dev"),  # same minor: left alone
    ("1.0.0", "1.2.0", "1.0.0"),  # older than the runtime: left alone
    ("2.0.0", "1.0.0", "2.0.0"),  # another major is no promise of compatibility: the runtime judges
    ("garbage", "1.0.0", "garbage"),
    ("1.2.1", "", "1.2.1"),  # runtime version unknown: nothing to fit to
])
def test_fit_oci_version(version: str, runtime: str, expected: str) -> None:
    assert fit_oci_version(version, runtime) == expected


def test_guest_spec_fits_only_oci_version() -> None:
    host = {"ociVersion": "1.2.1", "process": {"args": ["sh"]}, "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}], "intelRdt": {"schemata": ["L3:0=f"]}}}
    fitted = guest_spec(host, "c1", "/r", terminal=False, runtime_version="1.0.0")
    plain = guest_spec(host, "c1", "/r", terminal=False)
    assert fitted["ociVersion"] == "1.0.0" and plain["ociVersion"] == "1.2.1"
    assert host["ociVersion"] == "1.2.1"  # the input is not changed
    # fields newer than the runtime's version stay: the runtime ignores what it does not know
    assert fitted["linux"]["intelRdt"] == host["linux"]["intelRdt"]
    assert {k: v for k, v in fitted.items() if k != "ociVersion"} == {k: v for k, v in plain.items()
                                                                     if k != "ociVersion"}
    no_version = guest_spec({k: v for k, v in host.items() if k != "ociVersion"}, "c1", "/r", terminal=False,
                            runtime_version="1.0.0")
    assert "ociVersion" not in no_version
