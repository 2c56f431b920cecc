"""`kata-py`: the operator's command. `env` shows the effective configuration, the accelerator
choice and the guest image; `template list|build|clear` manages the template cache; `pool` serves
ready VMs and spare shim daemons (`--size 0 --shims N`: spares only, e.g. on a template-only host)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from vmm.accel import detect_accel
from vmm.errors import VmmError

from .config import Config, load_config
from .errors import ShimError
from .factory.store import MIB, TemplateStore


def _store(config: Config) -> TemplateStore:
    return TemplateStore(config.factory.template_path(), config.factory.template_cache_max_mb * MIB)


def cmd_env(config: Config, args: argparse.Namespace) -> int:
    try:
        accel = detect_accel(config.hypervisor.accel)  # type: ignore[arg-type]
        accel_text = f"{accel.name} ({accel.reason})"
    except VmmError as exc:
        accel_text = f"unusable: {exc}"
    guest = config.guest_dir()
    manifest = guest / "manifest.json"
    info = {
        "config_source": config.source,
        "config": dataclasses.asdict(config),
        "accelerator": accel_text,
        "guest_dir": str(guest.resolve() if guest.exists() else guest),
        "guest_hash": json.loads(manifest.read_text()).get("hash") if manifest.is_file() else None,
        "template_dir": str(config.factory.template_path()),
    }
    print(json.dumps(info, indent=2))
    return 0


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

    from .factory.builds import build_dir
    from .factory.key import NoTemplate, guest_image_hash, qemu_version, template_key
    from .factory.template import ensure_template
    from .sandbox import VmSandbox

    async def build() -> int:
        accel = detect_accel(config.hypervisor.accel)  # type: ignore[arg-type]
        probe = VmSandbox("template-build", config, None)  # type: ignore[arg-type]  # only its vm_config is used
        cfg = probe.vm_config(probe.guest_image())
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
    sub.add_parser("env", help="show configuration, accelerator choice and guest image").set_defaults(fn=cmd_env)
    t = sub.add_parser("template", help="list, build (for the configured VM shape) or clear the template cache")
    t.add_argument("action", choices=("list", "build", "clear"))
    t.set_defaults(fn=cmd_template)
    pool = sub.add_parser("pool", help="serve a warm pool of restored VMs to shims")
    pool.add_argument("--socket", help="unix socket to listen on (default: [factory] pool_socket)")
    pool.add_argument("--size", type=int, help="VMs to keep ready (default: [factory] pool_size)")
    pool.add_argument("--shims", type=int, help="spare shim daemons to keep ready (default: [factory] pool_shims)")
    pool.set_defaults(fn=cmd_pool)
    args = p.parse_args(argv)
    try:
        config = load_config(args.config)
        return args.fn(config, args)
    except ShimError as exc:
        print(f"kata-py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
