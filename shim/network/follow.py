"""Follow the pod's netns after start: on every link/address/route change, sync the guest again.

The task belongs to the sandbox (started after the first sync, cancelled before teardown). It waits
on an rtnetlink socket of the netns without a thread; a burst of changes (a CNI plugin adds an address,
its route and brings the link up) becomes one sync once the netns has been quiet for DEBOUNCE_S.
Errors are logged and retried at the next change, or after RETRY_S: following must never take the
pod down.
"""

from __future__ import annotations

import errno
import logging
import math

import trio

from agent_client.protocol import Agent
from shim.network import host
from shim.network.pod import NicHost, PodNetwork

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.3
DEBOUNCE_MAX_S = 2.0  # a netns that never goes quiet is still synced this often
RETRY_S = 5.0
_RECV_BYTES = 1 << 16


async def follow(network: PodNetwork, vm: NicHost, agent: Agent, *,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Keep the guest in step with ``network.netns`` until cancelled. Started once the monitor
    socket listens; the first round syncs at once, for changes made since the caller's sync."""
    sock = trio.socket.from_stdlib_socket(await trio.to_thread.run_sync(host.monitor, network.netns))
    with sock:
        task_status.started()
        retry_after = 0.0  # sync at once
        while True:
            try:
                with trio.move_on_after(retry_after):
                    await _changes(sock)
            except OSError as exc:  # the socket itself failed: resync now and then rather than spin
                log.warning("netns %s: monitor: %s", network.netns, exc)
                await trio.sleep(RETRY_S)
            try:
                if await network.sync(vm, agent):
                    log.info("netns %s: guest network follows the netns again", network.netns)
                retry_after = math.inf
            except Exception as exc:  # logged, never raised: the pod keeps running
                log.warning("netns %s: guest network not updated (retrying): %s: %s", network.netns,
                            type(exc).__name__, exc)
                retry_after = RETRY_S


async def _changes(sock: trio.socket.SocketType) -> None:
    """Return once a change arrived and the netns then stayed quiet for DEBOUNCE_S."""
    await _recv(sock)
    with trio.move_on_after(DEBOUNCE_MAX_S):
        while True:
            with trio.move_on_after(DEBOUNCE_S) as quiet:
                await _recv(sock)
            if quiet.cancelled_caught:
                return


async def _recv(sock: trio.socket.SocketType) -> None:
    try:
        await sock.recv(_RECV_BYTES)
    except OSError as exc:
        if exc.errno != errno.ENOBUFS:  # ENOBUFS: messages were lost, which is a change as well
            raise
