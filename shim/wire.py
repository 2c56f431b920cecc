"""The few protobuf messages the short-lived `start` and `delete` actions handle, by hand.

`start` reads what containerd writes on its stdin, which changed over the releases
(parse_start_input): nothing (1.6+ without runtime options); the runtime options as a
google.protobuf.Any (1.6 through 2.2 when the runtime has options); containerd 2.3's
`containerd.runtime.bootstrap.v1.BootstrapParams` (api/runtime/bootstrap/v1/bootstrap.proto), in
binary — what 2.3 sends — or in JSON, as that proto's comment describes the protocol.

containerd runs the shim binary for every `start` and `delete` and waits for it: importing protobuf and
the generated task protos costs ~0.1 s of that wait, for one message in and one out. These encode and
decode exactly those messages on the protobuf wire format (tests check them against the generated
classes); everything else in the shim uses the generated code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

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


def _string_field(number: int, value: str) -> bytes:
    return _bytes_field(number, value.encode()) if value else b""  # proto3: empty is not written


def _int32(value: int) -> int:
    """A varint read for an int32/enum field: negatives come as ten-byte two's complement."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{what} is not UTF-8") from exc


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


# --- the `start` action's stdin and stdout ---------------------------------------------------------

FLAGS, OPTIONS, BOOTSTRAP, BOOTSTRAP_JSON = "flags", "options", "bootstrap", "bootstrap-json"
LOG_LEVEL_DEBUG = -4  # bootstrap.v1.LogLevel: INFO = 0, more verbose levels are negative


@dataclass(frozen=True)
class StartInput:
    """What containerd told `start` on stdin. `form` is FLAGS (stdin empty: all in the flags),
    OPTIONS (an Any), BOOTSTRAP or BOOTSTRAP_JSON; the other fields are "" / None where not said."""

    form: str
    config_path: str = ""
    instance_id: str = ""
    namespace: str = ""
    log_level: int | None = None
    containerd_version: str = ""
    ttrpc_address: str = ""
    grpc_address: str = ""
    containerd_binary: str = ""
    socket_dir: str = ""

    @property
    def bootstrap(self) -> bool:
        return self.form in (BOOTSTRAP, BOOTSTRAP_JSON)


def parse_start_input(raw: bytes) -> StartInput:
    """Tell containerd's `start` input apart and decode it. Raises WireError on malformed input.

    JSON starts with `{`, which as protobuf would be a group of field 15: no message here has one.
    An Any has only fields 1 (type_url) and 2 (value); BootstrapParams always carries more
    (containerd sets its version, addresses and binary), so any other field means BootstrapParams.
    Go's shims try BootstrapParams first, which reads an Any as instance_id/namespace; we must not.
    """
    if not raw.strip():
        return StartInput(FLAGS)
    if raw.lstrip()[:1] == b"{":
        return _bootstrap_json(raw)
    parsed = list(fields(raw))
    if all(number in (1, 2) and isinstance(value, bytes) for number, value in parsed):
        return StartInput(OPTIONS, config_path=config_path_from_options(raw))
    return _bootstrap_binary(parsed)


_BOOTSTRAP_STRINGS = {1: "instance_id", 2: "namespace", 4: "containerd_version", 5: "ttrpc_address",
                      6: "grpc_address", 7: "containerd_binary", 9: "socket_dir"}


def _bootstrap_binary(parsed: list[tuple[int, int | bytes]]) -> StartInput:
    """BootstrapParams {instance_id = 1; namespace = 2; LogLevel log_level = 3; containerd_version = 4;
    containerd_ttrpc_address = 5; containerd_grpc_address = 6; containerd_binary = 7;
    repeated Extension extensions = 8 (Extension {google.protobuf.Any value = 1}); optional socket_dir = 9}."""
    values: dict[str, object] = {}
    config_path = ""
    for number, value in parsed:
        if number in _BOOTSTRAP_STRINGS and isinstance(value, bytes):
            values[_BOOTSTRAP_STRINGS[number]] = _text(value, _BOOTSTRAP_STRINGS[number])
        elif number == 3 and isinstance(value, int):
            values["log_level"] = _int32(value)
        elif number == 8 and isinstance(value, bytes):
            for ext_number, any_bytes in fields(value):
                if ext_number == 1 and isinstance(any_bytes, bytes):
                    config_path = config_path_from_options(any_bytes) or config_path
        elif number in (*_BOOTSTRAP_STRINGS, 3, 8):
            raise WireError(f"BootstrapParams field {number} has the wrong wire type")
    return StartInput(BOOTSTRAP, config_path=config_path, **values)  # type: ignore[arg-type]


# protojson names (lowerCamelCase; the proto's own names are accepted too, as protojson does)
_JSON_STRINGS = {"instanceId": "instance_id", "namespace": "namespace", "containerdVersion": "containerd_version",
                 "containerdTtrpcAddress": "ttrpc_address", "containerdGrpcAddress": "grpc_address",
                 "containerdBinary": "containerd_binary", "socketDir": "socket_dir"}
_JSON_LEVELS = {"LOG_LEVEL_INFO": 0, "LOG_LEVEL_TRACE": -8, "LOG_LEVEL_DEBUG": -4, "LOG_LEVEL_WARN": 4,
                "LOG_LEVEL_ERROR": 8, "LOG_LEVEL_FATAL": 10, "LOG_LEVEL_PANIC": 12}


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _bootstrap_json(raw: bytes) -> StartInput:
    """BootstrapParams in protojson: the runtime options are an extension's `value`, an Any in
    protojson's form ({"@type": ".../runtimeoptions.v1.Options", "configPath": ...})."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"BootstrapParams JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise WireError("BootstrapParams JSON: not an object")
    values: dict[str, object] = {}
    for camel, ours in _JSON_STRINGS.items():
        value = doc.get(camel, doc.get(_snake(camel)))
        if value is None:
            continue
        if not isinstance(value, str):
            raise WireError(f"BootstrapParams JSON: {camel} is not a string")
        values[ours] = value
    level = doc.get("logLevel", doc.get("log_level"))
    if level is not None:
        if isinstance(level, str) and level in _JSON_LEVELS:
            values["log_level"] = _JSON_LEVELS[level]
        elif isinstance(level, int) and not isinstance(level, bool):
            values["log_level"] = level
        else:
            raise WireError(f"BootstrapParams JSON: logLevel {level!r}")
    config_path = ""
    extensions = doc.get("extensions") or []
    if not isinstance(extensions, list):
        raise WireError("BootstrapParams JSON: extensions is not a list")
    for ext in extensions:
        value = ext.get("value") if isinstance(ext, dict) else None
        if not isinstance(value, dict):
            raise WireError("BootstrapParams JSON: an extension has no value object")
        if str(value.get("@type", "")).rsplit("/", 1)[-1] == RUNTIME_OPTIONS_TYPE:
            path = value.get("configPath", value.get("config_path", ""))
            if not isinstance(path, str):
                raise WireError("BootstrapParams JSON: configPath is not a string")
            config_path = path or config_path
    return StartInput(BOOTSTRAP_JSON, config_path=config_path, **values)  # type: ignore[arg-type]


def encode_bootstrap_result(version: int, address: str, protocol: str = "ttrpc") -> bytes:
    """BootstrapResult {int32 version = 1; string address = 2; string protocol = 3} (capabilities and
    metadata left empty)."""
    return _varint_field(1, version) + _string_field(2, address) + _string_field(3, protocol)


def bootstrap_result_json(version: int, address: str, protocol: str = "ttrpc") -> bytes:
    """The same as JSON: protojson's names for these three fields are also those of the legacy JSON
    answer containerd 1.7+ reads ({"version", "address", "protocol"})."""
    return json.dumps({"version": version, "address": address, "protocol": protocol},
                      separators=(",", ":")).encode()
