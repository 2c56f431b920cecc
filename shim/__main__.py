"""containerd-shim-kata-py-v2: the binary containerd runs (flags as Go's flag package parses them)."""

from __future__ import annotations

import argparse
import os
import sys

from .manager import SOCKET_DIR, ShimArgs

VERSION = "0.1.0"


def parse_args(argv: list[str]) -> tuple[ShimArgs, str, str, bool]:
    p = argparse.ArgumentParser(prog="containerd-shim-kata-py-v2", allow_abbrev=False)
    for flag in ("-namespace", "-id", "-address", "-publish-binary", "-bundle", "-socket", "-config",
                 "-grouping"):
        p.add_argument(flag, f"-{flag}", default="")
    p.add_argument("-socket-dir", "--socket-dir", default=os.environ.get("KATA_PY_SOCKET_DIR", SOCKET_DIR))
    p.add_argument("-debug", "--debug", action="store_true")
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("action", nargs="?", default="", choices=["", "start", "delete"])
    ns = p.parse_args(argv)
    args = ShimArgs(namespace=ns.namespace, id=ns.id, address=ns.address, publish_binary=ns.publish_binary,
                    bundle=ns.bundle, debug=ns.debug, socket_dir=ns.socket_dir, config_path=ns.config)
    return args, ns.action, ns.grouping or ns.id, ns.version


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["-spare"] and len(argv) >= 2:  # `kata-py pool` starts spares: shim/spare.py
        from .spare import run_spare

        return run_spare(argv[1])
    args, action, grouping, version = parse_args(argv)
    if version:
        print(f"containerd-shim-kata-py-v2 version {VERSION}")
        return 0
    if action == "start":  # containerd 2.3 may name the namespace and id on stdin only
        from . import manager

        try:
            answer = manager.start(args, sys.stdin.buffer.read())
        except Exception as exc:  # containerd shows our combined output: one clear line
            print(f"kata-py start: {exc}", end="")
            return 1
        sys.stdout.buffer.write(answer)  # exactly the answer: containerd parses the whole output
        return 0
    if not args.namespace or not args.id:
        print("-namespace and -id are required", file=sys.stderr)
        return 2
    if action == "delete":
        from . import manager

        try:
            sys.stdout.buffer.write(manager.delete(args))
        except Exception as exc:
            print(f"kata-py delete: {exc}", file=sys.stderr)
            return 1
        return 0
    from . import daemon

    return daemon.run(args, grouping)


if __name__ == "__main__":
    raise SystemExit(main())
