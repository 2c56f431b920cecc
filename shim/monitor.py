"""`kata-py metrics SANDBOX` (one running pod's metrics, as its shim serves them) and `kata-py monitor`
(every running pod's, labelled with its CRI metadata, over HTTP for Prometheus): shim/metrics/aggregate.py.
Only the stdlib at import: `kata-py check` must run when trio itself is broken."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .config import Config

DEFAULT_LISTEN = "127.0.0.1:8090"


def cmd_metrics(config: Config, args: argparse.Namespace) -> int:
    import trio

    from .layout import sandboxes_dir
    from .metrics.aggregate import find_sandbox, scrape_shim
    from .metrics.pod import SOCKET_NAME

    state_dir = find_sandbox(config.runtime.state_dir, args.sandbox)
    if state_dir is None:
        print(f"kata-py metrics: no running sandbox {args.sandbox!r} with a metrics socket in "
              f"{sandboxes_dir(config.runtime.state_dir)}", file=sys.stderr)
        return 1
    try:
        sys.stdout.write(trio.run(scrape_shim, state_dir))
    except (OSError, trio.TooSlowError) as exc:
        print(f"kata-py metrics: {state_dir / SOCKET_NAME}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_monitor(config: Config, args: argparse.Namespace) -> int:
    import trio

    from .metrics.aggregate import Monitor, parse_listen, serve_monitor

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"kata-py monitor: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(serve_monitor, Monitor(config.runtime.state_dir), host, port)
    except OSError as exc:
        print(f"kata-py monitor: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def add_commands(sub: Any) -> None:
    """`metrics` and `monitor` for `kata-py`'s parser (shim/cli.py)."""
    m = sub.add_parser("metrics", help="print one running pod's metrics (Prometheus text format)")
    m.add_argument("sandbox", help="the sandbox id (or a unique prefix of it)")
    m.set_defaults(fn=cmd_metrics)
    mon = sub.add_parser("monitor", help="serve every running pod's metrics over HTTP, for Prometheus")
    mon.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                     help=f"address to listen on (default {DEFAULT_LISTEN}; port 0: any free port)")
    mon.set_defaults(fn=cmd_monitor)
