"""containerd-shim-kata-py-v2: the binary containerd runs (flags as Go's flag package parses them).

`start` and `delete` (shim/manager.py) import no trio, grpc or protobuf; the daemon (shim/daemon.py)
is imported only when this process is to be one. A spare (shim/spare.py) waits for a pod, then is
given the daemon's arguments and runs on from here as a daemon `start` spawned would.
"""

from __future__ import annotations

import sys

from .args import parse_args, spare_socket

VERSION = "0.1.0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spare = spare_socket(argv)
    if spare is not None:  # `kata-py pool` starts spares: shim/spare.py
        from .spare import run_spare

        assigned = run_spare(spare)
        if assigned is None:  # the pool is gone, or the hand-off failed: nothing to serve
            return 0
        argv = assigned
    invocation = parse_args(argv)
    args, action = invocation.args, invocation.action
    if invocation.version:
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

    return daemon.run(args, invocation.grouping)


if __name__ == "__main__":
    raise SystemExit(main())
