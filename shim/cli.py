"""`kata-py`: the operator's command. `check` says whether this host can run kata-py (shim/check/),
`env` describes the runtime and the host (versions, effective configuration, accelerator, guest image); `template list|build|clear` manages the template cache; `pool` serves
ready VMs and spare shim daemons (`--size 0 --shims N`: spares only, e.g. on a template-only host)."""

from __future__ import annotations

import argparse
import sys
import time

from vmm.accel import detect_accel
from vmm.errors import VmmError

from .config import Config, load_config
from .errors import ShimError
from .factory.store import MIB, TemplateStore


def _store(config: Config) -> TemplateStore:
    return TemplateStore(config.factory.template_path(), config.factory.template_cache_max_mb * MIB)


def _config_or_error(args: argparse.Namespace) -> tuple[Config, str]:
    """check/env report a bad configuration (and go on with the defaults) instead of stopping."""
    try:
        return load_config(args.config), ""
    except ShimError as exc:
        return Config(source=args.config or "defaults"), str(exc)


def cmd_env(config: Config | None, args: argparse.Namespace) -> int:
    from .check import run_env

    config, error = _config_or_error(args)
    sys.stdout.write(run_env(config, error, args.containerd_config, as_json=args.json))
    return 0


def cmd_check(config: Config | None, args: argparse.Namespace) -> int:
    from .check import run_check

    config, error = _config_or_error(args)
    text, code = run_check(config, error, args.containerd_config, as_json=args.json)
    sys.stdout.write(text)
    return code


def cmd_template(config: Config, args: argparse.Namespace) -> int:
    if args.action == "build":
        return cmd_template_build(config)
    store = _store(config)
    if args.action == "clear":
        n = store.clear()
        print(f"removed {n} template(s) from {store.root}")
        return 0
    templates = store.list()
    if not templates:
        print(f"no templates in {store.root}")
        return 0
    print(f"{'key':34} {'MiB':>6} {'memory':>6} {'accel':5} {'guest':26} created")
    for t in templates:
        m = t.meta
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created", 0)))
        print(f"{t.key:34} {t.disk_bytes() / MIB:6.1f} {m.get('memory_mib', '?'):>6} {m.get('accel', '?'):5} "
              f"{str(m.get('guest', '?')):26} {created}")
    return 0


def cmd_template_build(config: Config) -> int:
    """Build the template for the configured sandbox shape now (install time, CI), waiting for a
    build another process has under way; a valid template is kept as it is."""
    import trio  # the VMM path: only for this command

    from agent_client.transport import vsock_available

    from .factory.builds import build_dir
    from .factory.key import NoTemplate, guest_image_hash, qemu_version, template_key
    from .factory.template import ensure_template
    from .vm_shape import agent_over_vsock, find_guest, vm_config

    async def build() -> int:
        accel = detect_accel(config.hypervisor.accel)  # type: ignore[arg-type]
        cfg = vm_config(config, "template-build", find_guest(config), vsock=agent_over_vsock(config, vsock_available()))
        key = template_key(cfg, accel, guest_image_hash(cfg), qemu_version())
        store = _store(config)
        existed = store.lookup(key) is not None
        t0 = time.monotonic()
        with build_dir(config.runtime.state_dir, key) as work_dir:
            await ensure_template(store, key, cfg, accel, work_dir=work_dir, timeout=config.agent.dial_timeout_s,
                                  wait=True)
        how = "present" if existed else f"built in {time.monotonic() - t0:.1f} s"
        print(f"template {key} ({accel.name}, {cfg.memory_mib} MiB): {how}, in {store.root}")
        return 0

    try:
        return trio.run(build)
    except (NoTemplate, VmmError, OSError, trio.TooSlowError) as exc:
        print(f"kata-py template build: {exc}", file=sys.stderr)
        return 1


def cmd_pool(config: Config, args: argparse.Namespace) -> int:
    from .factory.pool import run_pool  # imports trio and the VMM: only for this command

    return run_pool(config, socket_path=args.socket, size=args.size, shims=args.shims)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kata-py", description="kata-py runtime tools")
    p.add_argument("--config", help="configuration file (default: $KATA_PY_CONFIG, /etc/kata-py/configuration.toml)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, text in (
            ("check", cmd_check, "can this host run kata-py? one line per check; exit 0 when it can (warnings allowed)"),
            ("env", cmd_env, "describe the runtime and the host: versions, configuration, accelerator, guest image")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--json", action="store_true", help="machine-readable output (with a format_version)")
        c.add_argument("--containerd-config", default="/etc/containerd/config.toml", metavar="PATH",
                       help="containerd's configuration to inspect (default: /etc/containerd/config.toml)")
        c.set_defaults(fn=fn, own_config=True)
    t = sub.add_parser("template", help="list, build (for the configured VM shape) or clear the template cache")
    t.add_argument("action", choices=("list", "build", "clear"))
    t.set_defaults(fn=cmd_template)
    pool = sub.add_parser("pool", help="serve a warm pool of restored VMs to shims")
    pool.add_argument("--socket", help="unix socket to listen on (default: [factory] pool_socket)")
    pool.add_argument("--size", type=int, help="VMs to keep ready (default: [factory] pool_size)")
    pool.add_argument("--shims", type=int, help="spare shim daemons to keep ready (default: [factory] pool_shims)")
    pool.set_defaults(fn=cmd_pool)
    from .monitor import add_commands as add_monitor_commands  # metrics, monitor (issue #18)

    add_monitor_commands(sub)
    args = p.parse_args(argv)
    if getattr(args, "own_config", False):  # check/env load it themselves: a bad one is a finding
        return args.fn(None, args)
    try:
        config = load_config(args.config)
        return args.fn(config, args)
    except ShimError as exc:
        print(f"kata-py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
