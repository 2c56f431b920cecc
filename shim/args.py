"""The shim binary's command lines, in one place: the flags containerd passes (parsed as Go's flag
package parses them), the daemon's arguments `start` builds, and a spare's.

`start` writes what the daemon (spawned, or a spare handed the pod) reads back here, and the pool
starts spares with what `__main__` recognises here: one module, so the two ends cannot drift apart.
Stdlib and shim.layout only: `start` and `delete` import it (containerd waits for both on every pod),
and so does the daemon, for ShimArgs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from .layout import SOCKET_DIR, SOCKET_DIR_ENV

PROG = "containerd-shim-kata-py-v2"
SPARE_FLAG = "-spare"  # `python -m shim -spare <socket>`: a spare daemon (shim/spare.py)
CMDLINE_ROOM = 4096  # bytes of command line a spare reserves for the daemon's (spare.set_cmdline)
LISTEN_FD_ENV = "KATA_PY_LISTEN_FD"  # the listening ttrpc socket `start` hands the daemon, by number


@dataclass(frozen=True)
class ShimArgs:
    namespace: str
    id: str
    address: str  # containerd's gRPC socket
    publish_binary: str = ""
    bundle: str = ""
    debug: bool = False
    socket_dir: str = SOCKET_DIR
    config_path: str = ""


@dataclass(frozen=True)
class Invocation:
    """One run of the binary: the flags, the action ("" = the daemon), the grouping id (the pod's
    sandbox id: the daemon serves the whole pod), and whether only the version was asked for."""

    args: ShimArgs
    action: str
    grouping: str
    version: bool


def parse_args(argv: list[str]) -> Invocation:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False)
    for flag in ("-namespace", "-id", "-address", "-publish-binary", "-bundle", "-socket", "-config",
                 "-grouping"):
        p.add_argument(flag, f"-{flag}", default="")
    p.add_argument("-socket-dir", "--socket-dir", default=os.environ.get(SOCKET_DIR_ENV, SOCKET_DIR))
    p.add_argument("-debug", "--debug", action="store_true")
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("action", nargs="?", default="", choices=["", "start", "delete"])
    ns = p.parse_args(argv)
    args = ShimArgs(namespace=ns.namespace, id=ns.id, address=ns.address, publish_binary=ns.publish_binary,
                    bundle=ns.bundle, debug=ns.debug, socket_dir=ns.socket_dir, config_path=ns.config)
    return Invocation(args, ns.action, ns.grouping or ns.id, ns.version)


def daemon_argv(args: ShimArgs, grouping: str, config_path: str) -> list[str]:
    """The arguments of the pod's daemon (after `python -m shim`), as `start` launches or hands it."""
    argv = ["-namespace", args.namespace, "-id", args.id, "-address", args.address,
            "-publish-binary", args.publish_binary, "-socket-dir", args.socket_dir, "-grouping", grouping]
    if config_path:
        argv += ["-config", config_path]
    if args.debug:
        argv.append("-debug")
    return argv


def spare_socket(argv: list[str]) -> str | None:
    """The spare's socket when `argv` starts a spare (spare_argv's form), else None."""
    if argv[:1] == [SPARE_FLAG] and len(argv) >= 2:
        return argv[1]
    return None


def spare_argv(socket_path: str) -> list[str]:
    """The command line a pool starts a spare with (padded: see spare.set_cmdline)."""
    return [sys.executable, "-m", "shim", SPARE_FLAG, socket_path, "-room", "x" * CMDLINE_ROOM]
