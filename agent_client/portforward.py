"""The parts of a PortForward call that are not grpc: the request feed and the check of guest frames.

`Requests` is the request iterator grpc's own sending thread consumes (sync grpc takes an iterator
for a client stream); the trio side feeds it. Credits bound how many frames wait in it: the sender
takes one per frame and the consuming thread gives it back (through the trio token) once grpc took
the frame, so a slow guest slows the host's reader instead of filling memory.

`GuestFrames` is what the guest may answer, in order: `connected` first, then data frames of at most
PORT_FORWARD_CHUNK bytes, then at most one `eof`, then nothing. The guest is untrusted: anything else
ends the call with AgentBadResponse (the host resets its connection). It never names an address or a
port the host would use: the host only ever pipes to the connection it accepted.
"""

from __future__ import annotations

import queue
from typing import Any

import trio

from agent_client.errors import AgentBadResponse
from agent_client.protocol import PORT_FORWARD_CHUNK

WINDOW = 4  # frames host -> guest waiting for grpc at most (4 x 64 KiB)
_END = object()


class Requests:
    """A blocking iterator over frames put from trio. Create it in trio (it keeps the trio token)."""

    def __init__(self, first: Any, window: int = WINDOW) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, bool]] = queue.SimpleQueue()
        self._queue.put((first, False))
        self._token = trio.lowlevel.current_trio_token()
        self._credits = trio.Semaphore(window)
        self._closed = False

    def __iter__(self) -> Requests:
        return self

    def __next__(self) -> Any:
        """grpc's thread: the next frame, blocking; StopIteration after close() (the half-close)."""
        item, credited = self._queue.get()
        if item is _END:
            self._queue.put((_END, False))  # every later call stops too
            raise StopIteration
        if credited:
            try:
                self._token.run_sync_soon(self._credits.release)
            except trio.RunFinishedError:
                pass  # nobody left to send
        return item

    async def put(self, item: Any) -> None:
        """Queue a frame, waiting for a credit while WINDOW frames wait already."""
        if self._closed:
            raise RuntimeError("frame after the half-close")
        await self._credits.acquire()
        self._queue.put((item, True))

    @property
    def closed(self) -> bool:
        return self._closed

    def wake(self) -> None:
        """Trio side: let a sender blocked in put() go (the call ended; it then checks why)."""
        self._credits.release()

    def close(self) -> None:
        """End the request stream (idempotent). Also what frees grpc's thread when the call is over."""
        if not self._closed:
            self._closed = True
            self._queue.put((_END, False))


class GuestFrames:
    """Checks each guest frame against the protocol's order (see the module docstring)."""

    def __init__(self) -> None:
        self.connected = False
        self.eof = False

    def check(self, *, port: int, family: int, data: bytes, connected: bool, eof: bool) -> bytes:
        """Returns the frame's data (b"" for `connected` and `eof` frames). Raises AgentBadResponse."""
        if port or family:
            raise AgentBadResponse("port-forward: the guest sent a port or family")
        if len(data) > PORT_FORWARD_CHUNK:
            raise AgentBadResponse(f"port-forward: guest frame of {len(data)} bytes "
                                   f"(at most {PORT_FORWARD_CHUNK})")
        if self.eof:
            raise AgentBadResponse("port-forward: guest frame after its eof")
        if not self.connected:
            if not connected or data or eof:
                raise AgentBadResponse("port-forward: the guest's first frame is not `connected`")
            self.connected = True
            return b""
        if connected:
            raise AgentBadResponse("port-forward: `connected` twice")
        if eof:
            if data:
                raise AgentBadResponse("port-forward: data in the guest's eof frame")
            self.eof = True
            return b""
        if not data:
            raise AgentBadResponse("port-forward: empty guest frame")
        return data
