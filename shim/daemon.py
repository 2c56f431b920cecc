"""The long-lived shim daemon: one per pod, serving the Task API until Shutdown.

Runs detached (own session), logs into the bundle's `log` fifo that containerd reads, serves ttrpc on
the listening socket inherited from `start`, and exits once Shutdown finds no containers left (or on
SIGTERM), stopping its VM first. If its sandbox booted cold for want of a template, the template build
it started afterwards may keep it alive for a while after it stopped serving (TEMPLATE_BUILD_GRACE_S;
SIGTERM cancels the build).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import trio

import ttrpc

from .args import LISTEN_FD_ENV, ShimArgs
from .config import load_config
from .events import Publisher
from .layout import LOG_FIFO, socket_address, socket_path
from .metrics.pod import PodMetrics
from .sandbox import VmSandbox
from .service import TASK_SERVICE, TaskService
from .timing import log_shim_start

log = logging.getLogger("kata-py")
# how long a shim outlives its last container to finish the template build it started
TEMPLATE_BUILD_GRACE_S = 180.0


def _open_log(bundle: str, debug: bool) -> None:
    """Send logging to containerd through the bundle's `log` fifo (stderr stays /dev/null otherwise)."""
    try:
        fd = os.open(Path(bundle) / LOG_FIFO, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass  # no reader (containerd restarting) or no fifo (tests): keep quiet rather than block
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO,
                        format="time=%(asctime)s level=%(levelname)s msg=%(message)s logger=%(name)s")


async def serve(args: ShimArgs, grouping: str, listen_fd: int | None) -> None:
    config = load_config(args.config_path or None)
    if listen_fd is not None:
        # not inherited by QEMU: a listening socket held by a child would make a dead shim look alive
        os.set_inheritable(listen_fd, False)
        sock = socket.socket(fileno=listen_fd)
    else:  # started by hand / tests: bind ourselves
        sock = ttrpc.bind_unix_socket(socket_path(socket_address(args.address, args.namespace, grouping,
                                                                 args.socket_dir)))
    path = sock.getsockname()
    shutdown, stopped = trio.Event(), trio.Event()
    publisher = Publisher(args.namespace, os.environ.get("TTRPC_ADDRESS", ""), args.publish_binary,
                          args.address)
    log.info("shim %d serving %s for sandbox %s (config: %s)", os.getpid(), path, grouping, config.source)
    hurry = trio.Event()  # a signal: stop now, leave no background work behind
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            sandbox = VmSandbox(grouping, config, nursery)
            service = TaskService(sandbox, publisher, nursery, shutdown, stopped)
            metrics = PodMetrics(sandbox, service)  # the pod's management socket (shim-monitor.sock)
            await nursery.start(metrics.serve)
            server = ttrpc.Server()
            server.register(TASK_SERVICE, metrics.instrument(service.methods()))
            listener = ttrpc.listener_from_socket(sock)
            serving = trio.CancelScope()
            nursery.start_soon(_serve, server, listener, serving)
            log_shim_start(grouping)
            nursery.start_soon(_signals, shutdown, hurry)
            await shutdown.wait()
            log.info("shutting down")
            with trio.CancelScope(shield=True):
                with trio.move_on_after(30):
                    await sandbox.stop()
                stopped.set()
                await publisher.close(timeout=2)
            # containerd hangs up once Shutdown is answered (then runs `delete`): stop serving, then
            # let a template build we started finish so that the next pod finds a template
            if not hurry.is_set():
                with trio.move_on_after(1):  # let the Shutdown answer go out: containerd hangs up on it
                    await server.wait_no_connections()
            serving.cancel()
            await listener.aclose()
            _unlink(path)
            async with trio.open_nursery() as waiting:
                waiting.start_soon(_cancel_when, hurry, sandbox.cancel_background)
                await sandbox.wait_background(TEMPLATE_BUILD_GRACE_S)
                waiting.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        _unlink(path)


async def _serve(server: ttrpc.Server, listener: trio.SocketListener, scope: trio.CancelScope) -> None:
    with scope:
        await server.serve(listener)


async def _cancel_when(event: trio.Event, cancel: Callable[[], None]) -> None:
    await event.wait()
    cancel()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def _signals(shutdown: trio.Event, hurry: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: shutting down", signum)
            shutdown.set()
            hurry.set()


def run(args: ShimArgs, grouping: str) -> int:
    os.environ.pop("NOTIFY_SOCKET", None)
    bundle = os.getcwd()
    _open_log(bundle, args.debug)
    # Not a child subreaper (unlike runc's shim, whose containers' processes are host processes):
    # the workload lives in the guest, our children (QEMU, loggers, ip) are each reaped by whoever
    # started them, and a grandchild orphaned by one of them (a logger's helper) goes to init,
    # which reaps it; adopted here it would stay a zombie, as nothing waits for unknown children.
    listen_fd = os.environ.pop(LISTEN_FD_ENV, None)
    try:
        trio.run(serve, args, grouping, int(listen_fd) if listen_fd else None)
    except Exception:
        log.exception("shim failed")
        return 1
    return 0
