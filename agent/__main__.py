"""Entry point: `python3 -m agent` (PID 1 in the guest) or `python3 -m agent --listen unix:PATH --root DIR`
(on a host, for tests).

Order matters for boot time: print the start marker, mount, open the host channel, and only then import
grpc (0.6-1.2 s under TCG); the channel bridge holds the host's first bytes until the server listens.
"""

import sys

print("KATA_PY_AGENT_START", flush=True)

import argparse  # noqa: E402  (after the start marker on purpose)
import os  # noqa: E402

GUEST_ROOT = "/run/kata-py"
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m agent", description="kata-py in-guest agent")
    p.add_argument("--listen", help="serve here (unix:PATH) instead of the kernel command line's channel")
    p.add_argument("--root", default=GUEST_ROOT, help="agent state directory (default %(default)s)")
    p.add_argument("--runtime", default="", help="OCI runtime name or path (default: crun, else runc)")
    p.add_argument("--log", default="", help="log level (default: kata_py.log= or info)")
    return p.parse_args(argv)


def _boot(pid1: bool) -> list[str]:
    from agent import boot

    if not pid1:
        boot.become_subreaper()
        return []
    problems = boot.mount_api_filesystems()
    failed = boot.enable_cgroup_controllers()
    if failed:
        problems.append(f"cgroup controllers not enabled: {', '.join(failed)}")
    try:  # a pod without a network still has localhost: its containers talk over it
        boot.loopback_up()
    except OSError as e:
        problems.append(f"lo: {e}")
    return problems


def _open_channel(local_sock: str, log_level: str) -> str:
    """Start the host channel bridge from /proc/cmdline; return the log level it asks for."""
    from agent import channel, cmdline

    with open("/proc/cmdline") as f:
        cfg = cmdline.parse_cmdline(f.read())
    assert cfg.channel is not None
    if cfg.channel.kind == "vsock":
        channel.serve_vsock(int(cfg.channel.target), local_sock)
    else:
        channel.serve_serial(cfg.channel.target, local_sock)
    return log_level or cfg.log


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    pid1 = os.getpid() == 1
    for problem in _boot(pid1):
        print(f"KATA_PY_AGENT_WARNING {problem}", file=sys.stderr, flush=True)
    root = os.path.realpath(args.root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    log_level = args.log
    if args.listen:
        address = args.listen
        guest_mode = False
    else:
        local_sock = os.path.join(root, "agent.sock")
        if os.path.exists(local_sock):
            os.unlink(local_sock)
        address = f"unix:{local_sock}"
        log_level = _open_channel(local_sock, log_level)
        guest_mode = True

    from agent.app import Agent  # heavy: imports grpc

    agent = Agent(root=root, address=address, runtime=args.runtime, guest=guest_mode,
                  log_level=log_level or "info")
    agent.start()
    if guest_mode:
        agent.warm.before_ready()
        from agent.channel import HOST_CONNECTED

        agent.warm.clones(HOST_CONNECTED)
    print("KATA_PY_AGENT_READY", flush=True)
    agent.run_until_signalled()
    if pid1:
        _power_off()
    return 0


def _power_off() -> None:
    """PID 1 must never exit (the kernel would panic): power the VM off instead."""
    import ctypes

    os.sync()
    ctypes.CDLL(None).reboot(LINUX_REBOOT_CMD_POWER_OFF)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
