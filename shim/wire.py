"""The few protobuf messages the short-lived `start` and `delete` actions handle, by hand.

containerd runs the shim binary for every `start` and `delete` and waits for it: importing protobuf and
the generated task protos costs ~0.1 s of that wait, for one message in and one out. These encode and
decode exactly those messages on the protobuf wire format (tests check them against the generated
classes); everything else in the shim uses the generated code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """Malformed protobuf bytes."""


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives are ten-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field: ints for varints, bytes for length-delimited fields;
    fixed-width fields are skipped. Raises WireError on malformed input."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
            yield number, value
        elif kind == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise WireError("truncated length-delimited field")
            yield number, data[pos:pos + size]
            pos += size
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
            if pos > len(data):
                raise WireError("truncated fixed-width field")
        else:
            raise WireError(f"unsupported wire type {kind}")


def _field(number: int, kind: int, payload: bytes) -> bytes:
    return _varint(number << 3 | kind) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _field(number, _VARINT, _varint(value)) if value else b""  # proto3: zero is not written


def _bytes_field(number: int, value: bytes) -> bytes:
    return _field(number, _LEN, _varint(len(value)) + value)


def encode_timestamp(t: float) -> bytes:
    """google.protobuf.Timestamp {seconds = 1; nanos = 2}."""
    seconds = int(t // 1)
    nanos = int(round((t - seconds) * 1e9))
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    return _varint_field(1, seconds) + _varint_field(2, nanos)


def encode_delete_response(exit_status: int, pid: int = 0, exited_at: float | None = None) -> bytes:
    """containerd.runtime.v2.task.DeleteResponse {pid = 1; exit_status = 2; exited_at = 3}."""
    when = time.time() if exited_at is None else exited_at
    return _varint_field(1, pid) + _varint_field(2, exit_status) + _bytes_field(3, encode_timestamp(when))


RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"


def config_path_from_options(raw: bytes) -> str:
    """containerd's `start` stdin: a google.protobuf.Any {type_url = 1; value = 2}. When it holds a
    runtimeoptions.v1.Options {type_url = 1; config_path = 2}, return config_path, else "".
    Raises WireError on malformed bytes."""
    type_url, value = "", b""
    for number, field_value in fields(raw):
        if number == 1 and isinstance(field_value, bytes):
            type_url = field_value.decode("utf-8", "replace")
        elif number == 2 and isinstance(field_value, bytes):
            value = field_value
    if type_url.rsplit("/", 1)[-1] != RUNTIME_OPTIONS_TYPE:
        return ""
    for number, field_value in fields(value):
        if number == 2 and isinstance(field_value, bytes):
            return field_value.decode("utf-8", "replace")
    return ""
