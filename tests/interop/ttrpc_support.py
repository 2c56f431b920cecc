"""Shared by the ttrpc component, interop tests and benchmark: the test service and a raw-frame peer.

The service mirrors gottrpc/main.go, so the Go and Python servers are interchangeable in tests."""

from __future__ import annotations

import trio
from google.protobuf.wrappers_pb2 import StringValue

from ttrpc import Frame, FrameDecoder, MessageType, Method, RequestContext, Server, StatusError, encode_frame
from ttrpc.codec import Request, Response, decode_response, encode_request

SERVICE = "kata.test.Echo"


class EchoService:
    """kata.test.Echo, with hooks so tests can watch a call start and get cancelled."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()

    async def echo(self, ctx: RequestContext, req: StringValue) -> StringValue:
        return StringValue(value=req.value)

    async def fail(self, ctx: RequestContext, req: StringValue) -> StringValue:
        code, _, message = req.value.partition(":")
        raise StatusError(message, int(code))

    async def boom(self, ctx: RequestContext, req: StringValue) -> StringValue:
        raise RuntimeError("boom")

    async def sleep(self, ctx: RequestContext, req: StringValue) -> StringValue:
        self.started.set()
        try:
            await trio.sleep(parse_duration(req.value))
        except trio.Cancelled:
            self.cancelled.set()
            raise
        return StringValue(value="slept")

    async def metadata(self, ctx: RequestContext, req: StringValue) -> StringValue:
        return StringValue(value=",".join(v for k, v in ctx.metadata if k == req.value))

    async def big(self, ctx: RequestContext, req: StringValue) -> StringValue:
        return StringValue(value="x" * int(req.value))

    def register(self, server: Server) -> None:
        server.register(SERVICE, {
            name: Method(StringValue, getattr(self, name.lower()))
            for name in ("Echo", "Fail", "Boom", "Sleep", "Metadata", "Big")
        })


def parse_duration(text: str) -> float:
    """Seconds from "250ms", "2s" or "1.5" (the subset of Go durations the tests use)."""
    for suffix, scale in (("ms", 1e-3), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)


def request_frame(stream_id: int, method: str, value: str = "", *, service: str = SERVICE,
                  timeout_nano: int = 0, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    payload = StringValue(value=value).SerializeToString()
    return encode_frame(stream_id, MessageType.REQUEST,
                        encode_request(Request(service, method, payload, timeout_nano, metadata)))


class RawPeer:
    """The client end of a connection, speaking frames by hand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_frame(self) -> Frame:
        """Next frame; raises EOFError when the other side closed the connection."""
        while True:
            event = self.decoder.next_event()
            if event is not None:
                assert isinstance(event, Frame), event
                return event
            data = await self.stream.receive_some()
            if not data:
                raise EOFError
            self.decoder.feed(data)

    async def receive_response(self) -> tuple[int, Response]:
        frame = await self.receive_frame()
        assert frame.type == MessageType.RESPONSE and frame.flags == 0
        return frame.stream_id, decode_response(frame.payload)

    async def receive_responses(self, n: int) -> dict[int, Response]:
        return dict([await self.receive_response() for _ in range(n)])


def value_of(response: Response) -> str:
    assert response.code == 0, response
    return StringValue.FromString(response.payload).value
