"""io.katacontainers.* annotations: default deny, allowlist, value checks, asset paths and hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shim.annotations import apply_annotations
from shim.config import parse_config
from shim.errors import InvalidArgument

H = "io.katacontainers.config.hypervisor."


def cfg(allow: list[str], asset_dirs: list[str] | None = None, extra: str = ""):
    dirs = f"valid_asset_dirs = {asset_dirs!r}\n".replace("'", '"') if asset_dirs is not None else ""
    allow_s = "[" + ", ".join(f"'{a}'" for a in allow) + "]"  # TOML literal strings: regexes verbatim
    return parse_config(f"[hypervisor]\nmax_vcpus = 4\nmax_memory_mib = 2048\n{extra}{dirs}"
                        f"[runtime]\nenable_annotations = {allow_s}\n")


@pytest.fixture
def asset(tmp_path: Path) -> tuple[Path, str]:
    d = tmp_path / "assets"
    d.mkdir()
    f = d / "vmlinux"
    f.write_bytes(b"not really a kernel" * 100)
    return f, hashlib.sha512(f.read_bytes()).hexdigest()


def test_no_annotations_change_nothing():
    c = cfg([])
    eff = apply_annotations(c, {"io.kubernetes.cri.container-type": "sandbox", "other": "x"})
    assert eff.config == c and eff.assets.kernel is None


def test_default_deny():
    with pytest.raises(InvalidArgument, match=r"default_vcpus is not enabled.*enable_annotations"):
        apply_annotations(cfg([]), {H + "default_vcpus": "2"})


def test_allowlist_is_a_full_match_on_the_key_without_prefix():
    with pytest.raises(InvalidArgument, match="not enabled"):
        apply_annotations(cfg(["default_vcpus"]), {H + "default_vcpus": "2"})  # not the whole key
    with pytest.raises(InvalidArgument, match="not enabled"):
        apply_annotations(cfg(["config.hypervisor.default"]), {H + "default_vcpus": "2"})
    eff = apply_annotations(cfg([r"config\.hypervisor\.default_.*"]),
                            {H + "default_vcpus": "2", H + "default_memory": "1024"})
    assert eff.config.hypervisor.default_vcpus == 2
    assert eff.config.hypervisor.default_memory_mib == 1024


@pytest.mark.parametrize("key,value,match", [
    ("default_vcpus", "0", "outside 1..4"),
    ("default_vcpus", "5", "outside 1..4"),
    ("default_vcpus", "two", "not a non-negative integer"),
    ("default_vcpus", "-1", "not a non-negative integer"),
    ("default_memory", "64", "outside 128..2048"),
    ("default_memory", "4096", "outside 128..2048"),
    ("kernel_params", "init=/bin/sh", "'init' is reserved"),
    ("kernel_params", "kata_py.channel=vsock:1", "reserved"),
    ("kernel_params", "a=$(reboot)", "malformed"),
])
def test_bad_values(key: str, value: str, match: str):
    with pytest.raises(InvalidArgument, match=match):
        apply_annotations(cfg([".*"]), {H + key: value})


def test_enabled_but_unsupported_is_refused():
    with pytest.raises(InvalidArgument, match="enable_iommu is not supported"):
        apply_annotations(cfg([".*"]), {H + "enable_iommu": "true"})
    with pytest.raises(InvalidArgument, match="not supported"):
        apply_annotations(cfg([".*"]), {"io.katacontainers.pkg.oci.bundle_path": "/x"})


def test_kernel_params_are_appended():
    eff = apply_annotations(cfg([".*"], extra='kernel_params = "quiet"\n'),
                            {H + "kernel_params": "loglevel=7 debug"})
    assert eff.config.hypervisor.kernel_params == "quiet loglevel=7 debug"


def test_asset_with_matching_hash(asset: tuple[Path, str]):
    path, digest = asset
    eff = apply_annotations(cfg([".*"], [str(path.parent)]),
                            {H + "kernel": str(path), H + "kernel_hash": digest.upper(),
                             H + "asset_hash_type": "sha512"})
    assert eff.assets.kernel == path.resolve()


def test_asset_hash_mismatch(asset: tuple[Path, str]):
    path, _ = asset
    with pytest.raises(InvalidArgument, match="does not match .*kernel_hash"):
        apply_annotations(cfg([".*"], [str(path.parent)]), {H + "kernel": str(path), H + "kernel_hash": "0" * 128})


@pytest.mark.parametrize("case,match", [
    ("relative", "not absolute"),
    ("outside", "not under a valid asset directory"),
    ("escape", "not under a valid asset directory"),
    ("symlink_out", "not under a valid asset directory"),
    ("no_hash", "needs its sha512"),
    ("bad_hash", "not a sha512 hex digest"),
    ("missing", "not a regular file"),
    ("no_dirs", "valid_asset_dirs is empty"),
    ("hash_only", "given without"),
    ("md5", "only sha512"),
])
def test_asset_rules(asset: tuple[Path, str], tmp_path: Path, case: str, match: str):
    path, digest = asset
    outside = tmp_path / "elsewhere"
    outside.write_bytes(path.read_bytes())
    link = path.parent / "link"
    link.symlink_to(outside)
    dirs = [str(path.parent)]
    ann = {H + "kernel": str(path), H + "kernel_hash": digest}
    if case == "relative":
        ann[H + "kernel"] = "assets/vmlinux"
    elif case == "outside":
        ann[H + "kernel"] = str(outside)
    elif case == "escape":
        ann[H + "kernel"] = f"{path.parent}/../elsewhere"
    elif case == "symlink_out":
        ann[H + "kernel"] = str(link)
    elif case == "no_hash":
        del ann[H + "kernel_hash"]
    elif case == "bad_hash":
        ann[H + "kernel_hash"] = "sha512:abc"
    elif case == "missing":
        ann[H + "kernel"] = str(path.parent / "nope")
    elif case == "no_dirs":
        dirs = []
    elif case == "hash_only":
        ann = {H + "initrd_hash": digest}
    elif case == "md5":
        ann[H + "asset_hash_type"] = "md5"
    with pytest.raises(InvalidArgument, match=match):
        apply_annotations(cfg([".*"], dirs), ann)


def test_bad_allowlist_regex_is_a_config_error():
    with pytest.raises(InvalidArgument, match="bad regex"):
        apply_annotations(cfg(["("]), {H + "default_vcpus": "1"})
