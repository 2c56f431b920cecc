"""Task events to containerd: one queue, one forwarder task, published in order.

Handlers never publish themselves; they `publish()` into the queue (never blocks, never fails) and a
single forwarder sends each envelope with ttrpc `containerd.services.events.ttrpc.v1.Events/Forward`
to $TTRPC_ADDRESS, as containerd 1.6's own shims do. A failed send is retried with back-off and dropped
after a few tries (runc's publisher does the same); a closed connection is redialled. When no
TTRPC_ADDRESS is known, containerd's `publish` binary is used instead (a process per event).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

import ttrpc
from protos.containerd.api.events import task_pb2 as events_pb2
from protos.containerd.api.services.ttrpc.events.v1 import events_pb2 as forward_pb2

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
QUEUE_SIZE = 2048
MAX_TRIES = 5
SEND_TIMEOUT_S = 5.0

TOPICS: dict[type[Message], str] = {
    events_pb2.TaskCreate: "/tasks/create",
    events_pb2.TaskStart: "/tasks/start",
    events_pb2.TaskExit: "/tasks/exit",
    events_pb2.TaskDelete: "/tasks/delete",
    events_pb2.TaskExecAdded: "/tasks/exec-added",
    events_pb2.TaskExecStarted: "/tasks/exec-started",
    events_pb2.TaskOOM: "/tasks/oom",
    events_pb2.TaskPaused: "/tasks/paused",
    events_pb2.TaskResumed: "/tasks/resumed",
}


def pack_any(msg: Message) -> any_pb2.Any:
    # containerd's typeurl looks the bare full name up verbatim: no type.googleapis.com/ prefix
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def timestamp(at: float | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return ts


@dataclass(frozen=True)
class Envelope:
    topic: str
    event: Message
    at: float


class Publisher:
    """Owns the event queue; `run()` is its single forwarder task."""

    def __init__(self, namespace: str, ttrpc_address: str = "", publish_binary: str = "",
                 containerd_address: str = "") -> None:
        self.namespace = namespace
        self._ttrpc_address = ttrpc_address
        self._publish_binary = publish_binary
        self._containerd_address = containerd_address
        self._send, self._receive = trio.open_memory_channel[Envelope](QUEUE_SIZE)
        self.published: list[Envelope] = []  # what reached containerd, newest last (bounded)
        self.on_published: Callable[[Envelope], None] | None = None
        self._drained = trio.Event()

    def publish(self, event: Message) -> None:
        """Queue an event; drops it with a log line if the queue is full (containerd is gone)."""
        envelope = Envelope(TOPICS[type(event)], event, time.time())
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            log.error("event queue full, dropping %s", envelope.topic)
        except trio.ClosedResourceError:
            log.warning("publisher closed, dropping %s", envelope.topic)

    async def close(self, timeout: float = 2.0) -> None:
        """Stop accepting events and give the forwarder `timeout` seconds to drain the queue."""
        self._send.close()
        with trio.move_on_after(timeout):
            await self._drained.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward queued events in order until the queue is closed and drained."""
        task_status.started()
        try:
            if self._ttrpc_address:
                await self._forward_loop()
            else:
                async for envelope in self._receive:
                    await self._with_retries(envelope, self._publish_with_binary)
        finally:
            self._drained.set()

    async def _forward_loop(self) -> None:
        backlog: Envelope | None = None  # the event being delivered, kept across reconnects
        tries = 0
        while True:
            try:
                async with ttrpc.open_client(self._ttrpc_address) as client:
                    while True:
                        backlog = backlog or await self._receive.receive()
                        await self._forward(client, backlog)
                        self._record(backlog)
                        backlog, tries = None, 0
            except trio.EndOfChannel:
                return
            except (OSError, ttrpc.TtrpcError) as exc:
                tries += 1
                topic = backlog.topic if backlog else "-"
                log.warning("publish %s failed (try %d/%d): %s", topic, tries, MAX_TRIES, exc)
                if tries >= MAX_TRIES:
                    log.error("dropping event %s after %d tries", topic, MAX_TRIES)
                    backlog, tries = None, 0
                await trio.sleep(tries * 0.5)

    async def _with_retries(self, envelope: Envelope,
                            send: Callable[[Envelope], Awaitable[None]]) -> None:
        for attempt in range(1, MAX_TRIES + 1):
            try:
                await send(envelope)
                self._record(envelope)
                return
            except (OSError, ttrpc.TtrpcError) as exc:
                log.warning("publish %s failed (try %d/%d): %s", envelope.topic, attempt, MAX_TRIES, exc)
                await trio.sleep(attempt * 0.5)
        log.error("dropping event %s after %d tries", envelope.topic, MAX_TRIES)

    def _record(self, envelope: Envelope) -> None:
        self.published.append(envelope)
        del self.published[:-256]
        if self.on_published is not None:
            self.on_published(envelope)

    async def _forward(self, client: ttrpc.Client, envelope: Envelope) -> None:
        request = forward_pb2.ForwardRequest(envelope=forward_pb2.Envelope(
            timestamp=timestamp(envelope.at), namespace=self.namespace, topic=envelope.topic,
            event=pack_any(envelope.event)))
        await client.call(EVENTS_SERVICE, "Forward", request, empty_pb2.Empty, timeout=SEND_TIMEOUT_S,
                          metadata=[(NAMESPACE_KEY, self.namespace)])

    async def _publish_with_binary(self, envelope: Envelope) -> None:
        if not self._publish_binary:
            return  # nowhere to publish (tests without containerd)
        argv = [self._publish_binary, "--address", self._containerd_address, "publish", "--topic",
                envelope.topic, "--namespace", self.namespace]
        with trio.fail_after(SEND_TIMEOUT_S):
            result = await trio.run_process(argv, stdin=pack_any(envelope.event).SerializeToString(),
                                            capture_stdout=True, capture_stderr=True, check=False)
        if result.returncode != 0:
            raise OSError(f"{self._publish_binary} publish: {result.stderr.decode(errors='replace').strip()}")


