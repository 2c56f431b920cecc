"""Regenerate protos/: copy containerd's .proto sources and run protoc.

    python -m protos.generate            # refresh sources (if Debian's are installed) and generate
    python -m protos.generate --check    # exit 1 if any generated file is stale

Sources come from Debian's golang-github-containerd-containerd-dev (containerd 1.6.20) and
golang-github-containerd-cgroups-dev. They are copied under protos/ with two rewrites that change no
field name or number: gogoproto / containerd.plugin options are dropped (they only steer Go code
generation), and Go import paths become protos/... so that the generated Python modules import each
other as the `protos` package. Our own protos (ttrpc/, agent/) live here directly, as does
k8s/cri/v1/api.proto: a hand-written subset of Kubernetes' CRI API (upstream names and field numbers)
for the tests' CRI client.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOCODE = Path("/usr/share/gocode/src/github.com")

# upstream path (under GOCODE) -> path under protos/
UPSTREAM = {
    "containerd/containerd/runtime/v2/task/shim.proto": "containerd/runtime/v2/task/shim.proto",
    "containerd/containerd/api/types/mount.proto": "containerd/api/types/mount.proto",
    "containerd/containerd/api/types/task/task.proto": "containerd/api/types/task/task.proto",
    "containerd/containerd/api/events/task.proto": "containerd/api/events/task.proto",
    "containerd/containerd/api/services/ttrpc/events/v1/events.proto":
        "containerd/api/services/ttrpc/events/v1/events.proto",
    "containerd/containerd/pkg/runtimeoptions/v1/api.proto": "containerd/pkg/runtimeoptions/v1/api.proto",
    "containerd/cgroups/stats/v1/metrics.proto": "cgroups/stats/v1/metrics.proto",
    "containerd/cgroups/v2/stats/metrics.proto": "cgroups/v2/stats/metrics.proto",
}
OWN = ["ttrpc/ttrpc.proto", "agent/v1/agent.proto", "k8s/cri/v1/api.proto"]
GRPC_SERVICES = {"agent/v1/agent.proto", "k8s/cri/v1/api.proto"}  # gRPC stubs: agent, CRI (tests); ttrpc none

_GOGO_IMPORT = re.compile(r'^\s*import\s+(weak\s+)?"(gogoproto/gogo|github\.com/gogo/protobuf/gogoproto/gogo'
                          r'|github\.com/containerd/containerd/protobuf/plugin/fieldpath)\.proto";\s*$')
_GOGO_OPTION = re.compile(r"^\s*option\s+\((gogoproto|containerd\.plugin)\.[a-z_]+\)\s*=.*;\s*$")
_GOGO_INLINE = re.compile(r"\s*\[\((gogoproto|containerd\.plugin)\.[^\]]*\]")
_IMPORT_PATHS = [("github.com/containerd/containerd/", "protos/containerd/"),
                 ("github.com/containerd/cgroups/", "protos/cgroups/")]


def rewrite(text: str) -> str:
    """Strip Go-only options and map Go import paths onto protos/."""
    out = []
    for line in text.splitlines():
        if _GOGO_IMPORT.match(line) or _GOGO_OPTION.match(line):
            continue
        line = _GOGO_INLINE.sub("", line)
        if line.lstrip().startswith("import "):
            for old, new in _IMPORT_PATHS:
                line = line.replace(old, new)
        out.append(line)
    return "\n".join(out) + "\n"


def refresh_sources() -> None:
    missing = [src for src in UPSTREAM if not (GOCODE / src).is_file()]
    if missing:  # another Debian Go package may make GOCODE without containerd's sources
        print(f"{GOCODE / missing[0]} missing: keeping the committed .proto copies", file=sys.stderr)
        return
    for src, dst in UPSTREAM.items():
        target = HERE / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"// Copied from {src} (Debian package), rewritten by protos/generate.py.\n"
                          + rewrite((GOCODE / src).read_text()))


def _protoc(out_dir: Path) -> None:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [f"protos/{p}" for p in [*UPSTREAM.values(), *OWN]]
    base = [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}", f"-I{include}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    subprocess.run([*base, *files], check=True, cwd=REPO)
    grpc_files = [f"protos/{p}" for p in GRPC_SERVICES]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}", f"-I{include}",
                    f"--grpc_python_out={out_dir}", *grpc_files], check=True, cwd=REPO)


def _generated(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.name.endswith(("_pb2.py", "_pb2.pyi",
                                                                                   "_pb2_grpc.py")))


def _ensure_packages() -> None:
    # every directory holding generated code must be a package for `import protos.x.y`
    for d in {p.parent for p in HERE.rglob("*.proto")}:
        while d != HERE:
            (d / "__init__.py").touch()
            d = d.parent


def generate() -> None:
    refresh_sources()
    _ensure_packages()
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(Path(tmp))
        for rel in _generated(Path(tmp) / "protos"):
            shutil.copyfile(Path(tmp) / "protos" / rel, HERE / rel)


def check() -> int:
    """Regenerate into a temp dir and compare with what is committed."""
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(Path(tmp))
        fresh = _generated(Path(tmp) / "protos")
        stale = [str(rel) for rel in fresh
                 if not (HERE / rel).exists() or not filecmp.cmp(Path(tmp) / "protos" / rel, HERE / rel,
                                                                 shallow=False)]
        extra = sorted(set(map(str, _generated(HERE))) - set(map(str, fresh)))
    for rel in stale:
        print(f"stale: protos/{rel}", file=sys.stderr)
    for rel in extra:
        print(f"not generated by any source: protos/{rel}", file=sys.stderr)
    if stale or extra:
        print("run: python -m protos.generate", file=sys.stderr)
    return 1 if stale or extra else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    os.chdir(REPO)
    if args.check:
        return check()
    generate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
