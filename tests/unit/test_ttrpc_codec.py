"""ttrpc codec: frame layout, incremental decoding, size limits, Request/Response envelopes.

Rules these tests pin down (containerd/ttrpc v1.1.1 channel.go / types.go):
- header = uint32 BE payload length, uint32 BE stream id, uint8 type, uint8 flags; then the payload;
- a frame over 4 MiB is skipped on receive and reported as OversizedFrame, the stream stays in sync;
- we never encode a frame over 4 MiB (LocalProtocolError);
- a bad Request/Response envelope is the peer's fault (RemoteProtocolError).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.ttrpc import ttrpc_pb2
from ttrpc import (
    MAX_MESSAGE_LENGTH,
    Frame,
    FrameDecoder,
    LocalProtocolError,
    MessageType,
    OversizedFrame,
    RemoteProtocolError,
    encode_frame,
)
from ttrpc.codec import (
    HEADER_LEN,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from ttrpc.errors import Code


def decode_all(decoder: FrameDecoder, data: bytes) -> list[Frame | OversizedFrame]:
    decoder.feed(data)
    return list(decoder.events())


# --- frame layout -------------------------------------------------------------------------------

def test_header_layout_byte_for_byte() -> None:
    frame = encode_frame(0x01020304, MessageType.RESPONSE, b"hello", flags=0x05)
    assert frame == (b"\x00\x00\x00\x05"      # payload length, big-endian
                     b"\x01\x02\x03\x04"      # stream id, big-endian
                     b"\x02"                  # type: response
                     b"\x05"                  # flags
                     b"hello")
    assert HEADER_LEN == 10


def test_decode_hand_made_frame() -> None:
    raw = b"\x00\x00\x00\x03" b"\x00\x00\x00\x07" b"\x01" b"\x00" b"abc"
    assert decode_all(FrameDecoder(), raw) == [Frame(7, MessageType.REQUEST, 0, b"abc")]


def test_empty_payload_round_trip() -> None:
    raw = encode_frame(1, MessageType.REQUEST, b"")
    assert raw == b"\x00\x00\x00\x00\x00\x00\x00\x01\x01\x00"
    assert decode_all(FrameDecoder(), raw) == [Frame(1, 1, 0, b"")]


def test_max_size_payload_is_accepted_both_ways() -> None:
    payload = b"x" * MAX_MESSAGE_LENGTH
    assert decode_all(FrameDecoder(), encode_frame(3, MessageType.REQUEST, payload)) == [
        Frame(3, MessageType.REQUEST, 0, payload)]


@pytest.mark.parametrize("kwargs", [
    {"stream_id": -1}, {"stream_id": 1 << 32}, {"msg_type": 256}, {"msg_type": -1}, {"flags": 256},
])
def test_encode_refuses_out_of_range_header_fields(kwargs: dict[str, int]) -> None:
    args = {"stream_id": 1, "msg_type": 1, "payload": b"", "flags": 0} | kwargs
    with pytest.raises(LocalProtocolError):
        encode_frame(**args)


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds maximum message size of 4194304"):
        encode_frame(1, MessageType.REQUEST, b"x" * (MAX_MESSAGE_LENGTH + 1))


# --- incremental decoding -----------------------------------------------------------------------

frames = st.builds(
    Frame,
    stream_id=st.integers(0, 0xFFFFFFFF),
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    payload=st.binary(max_size=4096),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 1 << 20), max_size=20))
def test_frames_survive_any_chunking(sent: list[Frame], cuts: list[int]) -> None:
    data = b"".join(encode_frame(f.stream_id, f.type, f.payload, f.flags) for f in sent)
    decoder = FrameDecoder()
    got: list[Frame | OversizedFrame] = []
    for chunk in chunked(data, cuts):
        got += decode_all(decoder, chunk)
    assert got == sent
    assert decoder.buffered == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(frames, min_size=1, max_size=6), st.data())
def test_oversized_frames_are_skipped_and_reported(sent: list[Frame], data: st.DataObject) -> None:
    # a small limit keeps the property test fast; the real 4 MiB limit is tested below
    limit = 1024
    raw = b"".join(encode_frame(f.stream_id, f.type, f.payload, f.flags) for f in sent)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10))
    decoder = FrameDecoder(max_length=limit)
    got: list[Frame | OversizedFrame] = []
    for chunk in chunked(raw, cuts):
        got += decode_all(decoder, chunk)
    expected = [f if len(f.payload) <= limit else OversizedFrame(f.stream_id, f.type, len(f.payload))
                for f in sent]
    assert got == expected


def test_real_oversized_frame_then_next_frame_intact() -> None:
    big = MAX_MESSAGE_LENGTH + 1
    raw = (b"\x00\x40\x00\x01" b"\x00\x00\x00\x05" b"\x01\x00" + b"z" * big
           + encode_frame(7, MessageType.REQUEST, b"after"))
    decoder = FrameDecoder()
    got: list[Frame | OversizedFrame] = []
    for i in range(0, len(raw), 65536):  # as a socket would deliver it
        got += decode_all(decoder, raw[i:i + 65536])
    assert got == [OversizedFrame(5, MessageType.REQUEST, big), Frame(7, MessageType.REQUEST, 0, b"after")]
    assert got[0].message == "message length 4194305 exceed maximum message size of 4194304"


def test_oversized_frame_not_reported_until_skipped() -> None:
    decoder = FrameDecoder(max_length=4)
    assert decode_all(decoder, b"\x00\x00\x00\x08\x00\x00\x00\x01\x01\x00abcd") == []
    assert decode_all(decoder, b"efgh") == [OversizedFrame(1, 1, 8)]


@pytest.mark.parametrize("cut", range(0, 15))
def test_truncated_input_yields_nothing_until_complete(cut: int) -> None:
    raw = encode_frame(9, MessageType.RESPONSE, b"hello")
    decoder = FrameDecoder()
    assert decode_all(decoder, raw[:cut]) == []
    assert decoder.buffered == cut
    assert decode_all(decoder, raw[cut:]) == [Frame(9, MessageType.RESPONSE, 0, b"hello")]
    assert decode_all(decoder, b"") == []


# --- envelopes ----------------------------------------------------------------------------------

requests = st.builds(
    Request,
    service=st.text(max_size=40),
    method=st.text(max_size=40),
    payload=st.binary(max_size=2048),
    timeout_nano=st.integers(-(1 << 63), (1 << 63) - 1),
    metadata=st.lists(st.tuples(st.text(max_size=10).map(str.lower), st.text(max_size=20)),
                      max_size=5).map(tuple),
)


@given(requests)
def test_request_round_trip(req: Request) -> None:
    assert decode_request(encode_request(req)) == req


def test_request_wire_fields_match_ttrpc_proto() -> None:
    raw = encode_request(Request("containerd.task.v2.Task", "Create", b"\x01\x02", 5_000_000,
                                 (("containerd-namespace-ttrpc", "k8s.io"),)))
    msg = ttrpc_pb2.Request.FromString(raw)
    assert (msg.service, msg.method, msg.payload, msg.timeout_nano) == (
        "containerd.task.v2.Task", "Create", b"\x01\x02", 5_000_000)
    assert [(kv.key, kv.value) for kv in msg.metadata] == [("containerd-namespace-ttrpc", "k8s.io")]
    # field numbers: service=1, method=2 (length-delimited)
    assert raw.startswith(b"\x0a\x17containerd.task.v2.Task\x12\x06Create")


def test_request_metadata_keys_are_lowercased_on_decode() -> None:
    msg = ttrpc_pb2.Request(service="s", method="m")
    msg.metadata.add(key="Containerd-Namespace", value="Default")
    assert decode_request(msg.SerializeToString()).metadata == (("containerd-namespace", "Default"),)


@given(st.sampled_from(list(Code)), st.text(max_size=50), st.binary(max_size=1024))
def test_response_round_trip(code: Code, message: str, payload: bytes) -> None:
    expected = Response(int(code), message if code != Code.OK else "", payload)
    assert decode_response(encode_response(code, message, payload)) == expected


def test_ok_response_has_no_status_on_the_wire() -> None:
    assert encode_response(Code.OK, "", b"ab") == b"\x12\x02ab"
    assert encode_response(Code.NOT_FOUND, "gone") == b"\x0a\x08\x08\x05\x12\x04gone"


@pytest.mark.parametrize("junk", [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x07"])
def test_bad_envelopes_are_remote_protocol_errors(junk: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(junk)
    with pytest.raises(RemoteProtocolError):
        decode_response(junk)


def test_request_metadata_keys_are_lowercased_on_encode() -> None:
    # Go's MD lower-cases on Set and a Go server looks keys up as received
    raw = encode_request(Request("s", "m", b"", 0, (("X-Key", "A"),)))
    assert [(kv.key, kv.value) for kv in ttrpc_pb2.Request.FromString(raw).metadata] == [("x-key", "A")]
