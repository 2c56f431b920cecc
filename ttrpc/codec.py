"""Sans-IO ttrpc codec: frames and the Request/Response envelope (containerd/ttrpc v1.1.1).

Frame = 10-byte header + payload. Header (big-endian): uint32 payload length, uint32 stream id,
uint8 message type, uint8 flags. No I/O here: feed bytes in, take frames out; encode frames to bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from protos.ttrpc import ttrpc_pb2

from .errors import Code, LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">IIBB")
HEADER_LEN = HEADER.size  # 10
# ttrpc's messageLengthMax: larger frames are refused (inbound payload discarded, stream answered
# with RESOURCE_EXHAUSTED) so one bad message cannot make us buffer unbounded data.
MAX_MESSAGE_LENGTH = 4 << 20


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3  # ttrpc >= 1.2 streaming; containerd 1.6 never sends it


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose payload exceeded MAX_MESSAGE_LENGTH; its bytes were skipped."""

    stream_id: int
    type: int
    length: int

    @property
    def message(self) -> str:
        return f"message length {self.length} exceed maximum message size of {MAX_MESSAGE_LENGTH}"


def encode_frame(stream_id: int, msg_type: int, payload: bytes, flags: int = 0) -> bytes:
    """Return header + payload.

    Raises LocalProtocolError if the payload is over MAX_MESSAGE_LENGTH or the ids don't fit.
    """
    if len(payload) > MAX_MESSAGE_LENGTH:
        raise LocalProtocolError(
            f"message length {len(payload)} exceeds maximum message size of {MAX_MESSAGE_LENGTH}")
    if not 0 <= stream_id <= 0xFFFFFFFF or not 0 <= msg_type <= 0xFF or not 0 <= flags <= 0xFF:
        raise LocalProtocolError(f"header field out of range: stream={stream_id} type={msg_type} flags={flags}")
    return HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


class FrameDecoder:
    """Incremental frame parser: `feed()` bytes, then drain `next_event()` until it returns None."""

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self._max = max_length
        self._skip = 0  # payload bytes of an oversized frame still to discard
        self._pending_oversized: OversizedFrame | None = None

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (a truncated frame at EOF shows here)."""
        return len(self._buf) + (self._skip if self._pending_oversized else 0)

    def next_event(self) -> Frame | OversizedFrame | None:
        if self._pending_oversized is not None:
            take = min(self._skip, len(self._buf))
            del self._buf[:take]
            self._skip -= take
            if self._skip:
                return None
            event, self._pending_oversized = self._pending_oversized, None
            return event
        if len(self._buf) < HEADER_LEN:
            return None
        length, stream_id, msg_type, flags = HEADER.unpack_from(self._buf)
        if length > self._max:
            del self._buf[:HEADER_LEN]
            self._skip = length
            self._pending_oversized = OversizedFrame(stream_id, msg_type, length)
            return self.next_event()
        if len(self._buf) < HEADER_LEN + length:
            return None
        payload = bytes(self._buf[HEADER_LEN:HEADER_LEN + length])
        del self._buf[:HEADER_LEN + length]
        return Frame(stream_id, msg_type, flags, payload)

    def events(self) -> Iterable[Frame | OversizedFrame]:
        while (event := self.next_event()) is not None:
            yield event


Metadata = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Request:
    service: str
    method: str
    payload: bytes
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    code: int
    message: str
    payload: bytes


def encode_request(req: Request) -> bytes:
    msg = ttrpc_pb2.Request(service=req.service, method=req.method, payload=req.payload,
                            timeout_nano=req.timeout_nano)
    for key, value in req.metadata:
        # Go's ttrpc.MD lower-cases keys when they are set and its server looks them up as stored,
        # so a key sent with capitals would never be found by a Go server
        msg.metadata.add(key=key.lower(), value=value)
    return msg.SerializeToString()


def decode_request(payload: bytes) -> Request:
    """Raises RemoteProtocolError if the payload is not a ttrpc Request."""
    msg = ttrpc_pb2.Request()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise RemoteProtocolError(f"ttrpc: error unmarshalling request: {exc}") from None
    return Request(msg.service, msg.method, msg.payload, msg.timeout_nano,
                   tuple((kv.key.lower(), kv.value) for kv in msg.metadata))


def encode_response(code: int, message: str = "", payload: bytes = b"") -> bytes:
    msg = ttrpc_pb2.Response(payload=payload)
    if code != Code.OK:
        msg.status.code = code
        msg.status.message = message
    return msg.SerializeToString()


def decode_response(payload: bytes) -> Response:
    """Raises RemoteProtocolError if the payload is not a ttrpc Response."""
    msg = ttrpc_pb2.Response()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise RemoteProtocolError(f"ttrpc: error unmarshalling response: {exc}") from None
    return Response(msg.status.code, msg.status.message, msg.payload)
