"""shim/wire.py's hand-made messages against the generated protobuf classes."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2

from protos.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions
from protos.containerd.runtime.v2.task import shim_pb2
from shim import wire


@pytest.mark.parametrize("status,pid,at", [(137, 0, 1795603668.25), (0, 4242, 1.0), (255, 1, 0.999999999),
                                           (1, 2, 1700000000.0)])
def test_delete_response_parses_as_the_generated_class(status: int, pid: int, at: float):
    parsed = shim_pb2.DeleteResponse.FromString(wire.encode_delete_response(status, pid, at))
    assert (parsed.exit_status, parsed.pid) == (status, pid)
    assert parsed.exited_at.seconds + parsed.exited_at.nanos / 1e9 == pytest.approx(at, abs=1e-6)
    assert 0 <= parsed.exited_at.nanos < 1_000_000_000


def test_delete_response_defaults_to_now():
    parsed = shim_pb2.DeleteResponse.FromString(wire.encode_delete_response(137))
    assert parsed.exited_at.seconds > 1_700_000_000


def _options(config_path: str, type_url: str = "runtimeoptions.v1.Options") -> bytes:
    value = runtimeoptions.Options(type_url="io.containerd.kata-py.v2", config_path=config_path)
    return any_pb2.Any(type_url=type_url, value=value.SerializeToString()).SerializeToString()


def test_config_path_from_runtime_options():
    assert wire.config_path_from_options(_options("/etc/kata-py/x.toml")) == "/etc/kata-py/x.toml"
    long_path = "/p/" + "a" * 300  # a multi-byte length varint
    assert wire.config_path_from_options(_options(long_path, "type.googleapis.com/runtimeoptions.v1.Options")) \
        == long_path
    assert wire.config_path_from_options(_options("/x", "containerd.runc.v1.Options")) == ""
    assert wire.config_path_from_options(b"") == ""


@pytest.mark.parametrize("raw", [b"\x0a\x05abc", b"\x0a", b"\x08\xff\xff", b"\x0b"])
def test_malformed_options_raise_a_value_error(raw: bytes):
    with pytest.raises(ValueError):
        wire.config_path_from_options(raw)
