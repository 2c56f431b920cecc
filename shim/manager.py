"""The shim binary's `start` and `delete` actions, as containerd 1.6 through 2.3 run them.

`start`: find this container's pod shim by the grouping id; reuse it if its socket answers, else bind
the socket, launch the daemon with the listening socket as fd 3, write `address`, print the address
in the form the caller's start protocol wants (start_answer).
`delete`: clean up after a shim that is gone (or only this container's rootfs when the pod shim lives)
and print a DeleteResponse.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from vmm import procrecord

from . import mounts, oci, share, spare, wire
from .args import LISTEN_FD_ENV, ShimArgs, daemon_argv
from .config import load_config
from .factory.builds import reap_orphan_builds
from .layout import (
    ADDRESS_FILE,
    ADDRESS_TMP_FILE,
    SOCKET_DIR_FILE,
    sandbox_state_dir,
    socket_address,
    socket_path,
)
from .timing import START_CMD_ENV, process_age_s


def _answers(path: str, timeout: float = 0.1) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def write_address(bundle: str, address: str) -> None:
    tmp = Path(bundle) / ADDRESS_TMP_FILE
    tmp.write_text(address)
    tmp.rename(Path(bundle) / ADDRESS_FILE)


def config_path_from_options(raw: bytes) -> str:
    """The kata-py config path containerd's `start` input names (the runtime options' ConfigPath,
    bare or inside 2.3's BootstrapParams), or "". Raises ValueError (wire.WireError) on malformed bytes."""
    return wire.parse_start_input(raw).config_path


# the Task API we announce to a containerd that reads a bootstrap answer (2.3+): the daemon serves
# containerd.task.v2.Task, which containerd 2.x still speaks (its task v2 bridge); v3 is not served yet
TASK_API_VERSION = 2


def with_bootstrap(args: ShimArgs, given: wire.StartInput) -> ShimArgs:
    """The flags, completed by what containerd 2.3's BootstrapParams say (2.3 still passes the flags
    too; bootstrap wins where both speak, it is the protocol that stays). Raises ValueError when
    neither names the namespace and id."""
    if given.bootstrap:
        debug = args.debug or (given.log_level is not None and given.log_level <= wire.LOG_LEVEL_DEBUG)
        args = replace(args, namespace=given.namespace or args.namespace, id=given.instance_id or args.id,
                       address=given.grpc_address or args.address,
                       publish_binary=given.containerd_binary or args.publish_binary,
                       socket_dir=given.socket_dir or args.socket_dir, debug=debug)
    if not args.namespace or not args.id:
        raise ValueError("-namespace and -id are required")
    return args


def start_answer(given: wire.StartInput, address: str) -> bytes:
    """What `start` prints, in the form the caller reads.

    - BootstrapParams (binary, containerd 2.3+): a binary BootstrapResult; 2.3's parseStartResponse
      (core/runtime/v2/shim.go) unmarshals protobuf first, then falls back to the legacy forms.
      We announce the Task API version we serve (TASK_API_VERSION).
    - BootstrapParams in JSON: the result in JSON, as that protocol's documentation describes it.
    - Flags only, or the options Any (1.6 through 2.2): the plain address. 1.6 takes the trimmed
      output as the address and cannot read JSON; 1.7 reads JSON but refuses a version above 2;
      2.0-2.2 take a non-JSON answer as a version 2 ttrpc shim (2.1's parseStartResponse sets
      Version 2, Protocol "ttrpc", so NewTaskClient picks its task v2 bridge). Nothing on stdin tells
      1.7 from 2.x, so they all get the one answer all of them read.
    """
    if given.form == wire.BOOTSTRAP:
        return wire.encode_bootstrap_result(TASK_API_VERSION, address)
    if given.form == wire.BOOTSTRAP_JSON:
        return wire.bootstrap_result_json(TASK_API_VERSION, address)
    return address.encode()


def saved_socket_dir(bundle: str, default: str) -> str:
    """The socket directory `start` used for this bundle (2.3 names one in BootstrapParams, which
    `delete` is not given), else `default`."""
    try:
        return (Path(bundle) / SOCKET_DIR_FILE).read_text() or default
    except OSError:
        return default


def start(args: ShimArgs, stdin: bytes) -> bytes:
    """Run the `start` action; return what to print on stdout. Raises OSError/ValueError on failure."""
    given = wire.parse_start_input(stdin)
    args = with_bootstrap(args, given)
    return start_answer(given, _start(args, given))


def _start(args: ShimArgs, given: wire.StartInput) -> str:
    # start-only imports: `delete` (containerd waits for it after every shim exit) stays lean
    from ttrpc.sockets import bind_unix_socket

    bundle = os.getcwd()
    if given.socket_dir:
        (Path(bundle) / SOCKET_DIR_FILE).write_text(args.socket_dir)
    # the daemon publishes events to containerd's ttrpc address (2.3 names it in BootstrapParams too)
    environ = {**os.environ, **({"TTRPC_ADDRESS": given.ttrpc_address} if given.ttrpc_address else {})}
    annotations = oci.annotations_of(bundle)
    grouping = oci.grouping_id(args.id, annotations)
    address = socket_address(args.address, args.namespace, grouping, args.socket_dir)
    path = socket_path(address)
    config_path = given.config_path or args.config_path
    os.makedirs(args.socket_dir, mode=0o700, exist_ok=True)
    os.chmod(args.socket_dir, 0o700)
    try:
        listener = bind_unix_socket(path)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        if _answers(path):  # the pod's shim is alive: share it
            write_address(bundle, address)
            return address
        os.unlink(path)  # stale socket of a dead shim
        listener = bind_unix_socket(path)
    try:
        argv = daemon_argv(args, grouping, config_path)
        if not _hand_to_spare(argv, bundle, listener.fileno(), config_path, environ):
            with open(os.devnull, "r+b") as devnull:
                subprocess.Popen([sys.executable, "-m", "shim", *argv], cwd=bundle, stdin=devnull,
                                 stdout=devnull, stderr=devnull, pass_fds=(listener.fileno(),),
                                 start_new_session=True,
                                 env={**environ, LISTEN_FD_ENV: str(listener.fileno()),
                                      START_CMD_ENV: f"{process_age_s():.3f}"})
        write_address(bundle, address)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        listener.close()
    return address


def _hand_to_spare(argv: list[str], bundle: str, listen_fd: int, config_path: str,
                   environ: dict[str, str]) -> bool:
    """Give the pod to a spare daemon of the `kata-py pool` service, if the configuration names one
    and it has a spare ready (shim/spare.py); False: spawn the daemon. Never raises: whatever goes
    wrong here only costs the spawn."""
    try:
        pool_socket = load_config(config_path or None).factory.pool_socket
    except Exception:  # noqa: BLE001 (a bad config is the daemon's to report, in containerd's log)
        return False
    if not pool_socket:
        return False
    try:
        spare_socket = spare.take_spare(pool_socket)
        spare.hand_off(spare_socket, argv, bundle, {**environ, START_CMD_ENV: f"{process_age_s():.3f}"},
                       listen_fd)
        return True
    except (OSError, spare.HandOffError):
        # not a word on stdout/stderr: containerd takes start's whole output for the address
        return False


def delete(args: ShimArgs) -> bytes:
    """Run the `delete` action; return the serialized DeleteResponse to print.

    Idempotent, and never disturbs a live pod shim: when the pod's socket still answers, only this
    container's rootfs mount is released.
    """
    bundle = args.bundle or os.getcwd()
    annotations = oci.annotations_of(bundle)
    grouping = oci.grouping_id(args.id, annotations)
    path = socket_path(socket_address(args.address, args.namespace, grouping,
                                      saved_socket_dir(bundle, args.socket_dir)))
    rootfs = Path(bundle) / "rootfs"
    if rootfs.exists():
        mounts.unmount_all(rootfs)
    if not _answers(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if grouping == args.id or oci.pod_role(args.id, annotations).is_sandbox:
            config = load_config(args.config_path or None)
            # a shim that stopped its sandbox removed the state dir last (after the VM and the host
            # cgroups): then there is nothing left to clean, and containerd waits for us on every pod
            if sandbox_state_dir(config.runtime.state_dir, grouping).exists():
                cleanup_sandbox(config.runtime.state_dir, grouping)
                cleanup_host_cgroups(bundle, grouping, config.runtime.sandbox_cgroup_only)
            reap_orphan_builds(config.runtime.state_dir)  # a killed shim's template build
    return wire.encode_delete_response(exit_status=128 + signal.SIGKILL)


def cleanup_host_cgroups(bundle: str, sandbox_id: str, sandbox_cgroup_only: bool) -> None:
    """Remove the host cgroups a dead shim made for its sandbox (planned again from the bundle's spec)."""
    from .resources.cgroups import CgroupManager, detect_version, plan_cgroups, remove_overhead_root

    try:
        spec = json.loads((Path(bundle) / "config.json").read_text())
        cgroups_path = (spec.get("linux") or {}).get("cgroupsPath") or ""
        if not cgroups_path:
            return
        manager = CgroupManager(plan_cgroups(cgroups_path, sandbox_id, version=detect_version(),
                                             sandbox_cgroup_only=sandbox_cgroup_only))
        manager.delete()
        remove_overhead_root(manager)
    except (OSError, ValueError) as exc:
        print(f"kata-py delete: host cgroups of {sandbox_id}: {exc}", file=sys.stderr)


def cleanup_sandbox(state_root: str, sandbox_id: str) -> None:
    """Remove what a dead pod shim left: its QEMU, shared-dir mounts and state directory."""
    state = sandbox_state_dir(state_root, sandbox_id)
    try:
        # exactly the QEMU the shim started, restored or adopted from the pool, and only while pid
        # and start time still name it (vmm/procrecord.py): never a process it cannot prove is ours
        procrecord.kill_recorded(state / procrecord.QEMU_RECORD)
    except (OSError, ValueError) as exc:
        print(f"kata-py delete: QEMU of {sandbox_id}: {exc}", file=sys.stderr)
    if state.exists():
        # the guest share comes off whole (shim/share.py); then nothing of ours is mounted below, and
        # remove_tree never enters a mount that would not come off: the user's data behind it stays
        share.detach(state)
        left = mounts.remove_tree(state)
        if left:
            print(f"kata-py delete: left in {state} (still mounted): {', '.join(left)}", file=sys.stderr)
