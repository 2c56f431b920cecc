"""Rendering: the check report (one line per check, or JSON) and the `env` description (JSON, or
sections of `key: value` lines). Pure: facts and results in, text out."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

from vmm.accel import choose_accel
from vmm.errors import AccelUnavailable

from . import parse
from .checks import FAIL, OK, WARN, CheckResult, host_ok
from .facts import HostFacts, ProbeFailed

FORMAT_VERSION = 1  # of both JSON documents; bump when a field changes meaning or goes away
NAME_WIDTH = 17


def check_text(results: list[CheckResult], elapsed_s: float) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.status:<5} {r.name:<{NAME_WIDTH}} {r.found}")
        if r.fix and r.status != OK:
            lines.append(f"{'':<5} {'':<{NAME_WIDTH}} fix: {r.fix}")
    failed = [r.name for r in results if r.status == FAIL]
    warned = sum(r.status == WARN for r in results)
    if failed:
        lines.append(f"this host cannot run kata-py pods: {len(failed)} check(s) failed ({', '.join(failed)}); "
                     f"{warned} warning(s) [{elapsed_s:.2f} s]")
    else:
        lines.append(f"this host can run kata-py pods ({warned} warning(s)) [{elapsed_s:.2f} s]")
    return "\n".join(lines) + "\n"


def check_json(results: list[CheckResult], elapsed_s: float, versions: Mapping[str, str]) -> str:
    doc = {
        "format_version": FORMAT_VERSION,
        "kata_py_version": versions.get("kata-py", ""),
        "host_ok": host_ok(results),
        "counts": {s: sum(r.status == s for r in results) for s in (OK, WARN, FAIL)},
        "elapsed_s": round(elapsed_s, 3),
        "checks": [dataclasses.asdict(r) for r in results],
    }
    return json.dumps(doc, indent=2) + "\n"


def _fact(value: Any, build: Any) -> dict[str, Any]:
    """`build(value)`, or the probe's error."""
    return {"error": value.error} if isinstance(value, ProbeFailed) else build(value)


def env_info(f: HostFacts, runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The machine-readable description (`kata-py env --json`). `runtime`: kata-py, Python and
    library versions (environment.py)."""
    config = dataclasses.asdict(f.config)
    source = config.pop("source")

    def accel(k: Any) -> dict[str, Any]:
        try:
            choice = choose_accel(k.requested, k.probe)
            chosen: dict[str, str | None] = {"name": choice.name, "reason": choice.reason}
        except AccelUnavailable as exc:
            chosen = {"name": None, "reason": str(exc)}
        return {"requested": k.requested, **chosen,
                "kvm": {"opens": k.probe.opens, "api_version": k.probe.api_version, "pvm": k.probe.pvm,
                        "create_vm": "ok" if k.create_vm_error is None else k.create_vm_error or "not tried",
                        "error": k.probe.error}}

    def qemu(q: Any) -> dict[str, Any]:
        v = parse.parse_version(q.version_line)
        return {"binary": q.binary, "path": q.path, "version": parse.format_version(v) if v else None,
                "version_line": q.version_line, "error": q.error}

    def guest(g: Any) -> dict[str, Any]:
        m = g.manifest or {}
        return {"dir": g.dir, "path": g.resolved or None, "hash": m.get("hash"), "kernel": m.get("kernel_version"),
                "files": g.sizes, "missing": list(g.missing), "manifest_error": g.manifest_error}

    def containerd(c: Any) -> dict[str, Any]:
        v = parse.parse_version(c.version_line)
        return {"path": c.path, "version": parse.format_version(v) if v else None, "version_line": c.version_line,
                "pid": c.pid, "shim_search_path": c.search_path, "shim_search_path_source": c.path_source,
                "error": c.error}

    def containerd_config(cc: Any) -> dict[str, Any]:
        return {"path": cc.path, "exists": cc.exists, "version": cc.version, "files": list(cc.files),
                "error": cc.error, "kata_runtimes": [dataclasses.asdict(r) for r in cc.runtimes]}

    return {
        "format_version": FORMAT_VERSION,
        "kata_py": {"version": runtime.get("kata-py"), "path": runtime.get("kata-py-path")},
        "python": {"version": runtime.get("python"), "executable": runtime.get("python-executable")},
        "libraries": dict(runtime.get("libraries", {})),
        "host": {"kernel": runtime.get("kernel"), "arch": runtime.get("arch"), "cpus": runtime.get("cpus"),
                 "euid": f.euid},
        "config": {"path": source, "error": f.config_error, "values": config},
        "accel": _fact(f.kvm, accel),
        "vsock": _fact(f.vsock, lambda v: {"device": v.device, "available": v.exists,
                                           "agent_channel": "vsock" if v.exists else "virtio-serial"}),
        "qemu": _fact(f.qemu, qemu),
        "guest": _fact(f.guest, guest),
        "template": _fact(f.template, lambda t: {"enabled": t.enabled, "dir": t.root, "key": t.key or None,
                                                 "status": t.status if t.enabled else "off", "detail": t.detail}),
        "containerd": {**_fact(f.containerd, containerd), "config": _fact(f.containerd_config, containerd_config),
                       "shim_binary": _fact(f.shim_binary, lambda s: {"name": s.name, "path": s.found,
                                                                      "elsewhere": s.elsewhere})},
        "cgroup": _fact(f.cgroups, lambda c: {"version": c.version, "controllers": sorted(c.controllers),
                                              "unified_at": c.unified_at or None}),
        "directories": [_fact(d, lambda d: {"role": d.role, "path": d.path, "exists": d.exists, "usable": d.usable,
                                            "free_bytes": d.free_bytes, "fs_type": d.fs_type,
                                            "mount_point": d.mount_point, "error": d.error}) for d in f.dirs],
    }


def env_text(info: Mapping[str, Any]) -> str:
    """`[section]` blocks of `key: value` lines; nested tables flattened with dots."""
    lines = [f"{k}: {_scalar(v)}" for k, v in info.items() if not isinstance(v, dict | list)]
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"  {k}: {v}" for k, v in _flatten(value)]
        elif isinstance(value, list):
            for i, item in enumerate(value):
                lines.append(f"\n[{key}.{i}]")
                lines += [f"  {k}: {v}" for k, v in _flatten(item if isinstance(item, dict) else {"value": item})]
    return "\n".join(lines) + "\n"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
            for i, item in enumerate(v):
                yield from _flatten(item, f"{prefix}{k}.{i}.")
        else:
            yield f"{prefix}{k}", _scalar(v)


def _scalar(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v)) or "-"
    if isinstance(v, dict):
        return "-"
    return str(v)
