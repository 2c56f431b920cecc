"""`start` reads every input containerd 1.6 through 2.3 gives it and answers in the form each reads."""

from __future__ import annotations

import json

import pytest

from shim import wire
from shim.manager import TASK_API_VERSION, start_answer

ADDRESS = "unix:///run/containerd/s/abc"


def options_any(config_path: str) -> bytes:
    options = wire._string_field(2, config_path)
    return wire._string_field(1, f"type.googleapis.com/{wire.RUNTIME_OPTIONS_TYPE}") + wire._bytes_field(2, options)


def bootstrap(config_path: str = "/etc/kata-py/c.toml") -> bytes:
    ext = wire._bytes_field(1, options_any(config_path))
    return (wire._string_field(1, "c1") + wire._string_field(2, "k8s.io") + wire._varint_field(3, 0)
            + wire._string_field(4, "v2.3.0") + wire._string_field(5, "/run/containerd/containerd.sock.ttrpc")
            + wire._bytes_field(8, ext) + wire._string_field(9, "/run/containerd/s"))


def test_flags_only_gets_the_plain_address():  # containerd 1.6
    given = wire.parse_start_input(b"")
    assert given.form == wire.FLAGS and start_answer(given, ADDRESS) == ADDRESS.encode()


def test_options_any_names_the_config_and_gets_the_plain_address():  # 1.7 through 2.2
    given = wire.parse_start_input(options_any("/etc/kata-py/x.toml"))
    assert given.form == wire.OPTIONS and given.config_path == "/etc/kata-py/x.toml"
    assert start_answer(given, ADDRESS) == ADDRESS.encode()


def test_binary_bootstrap_params_get_a_binary_result():  # 2.3
    given = wire.parse_start_input(bootstrap())
    assert given.form == wire.BOOTSTRAP and (given.instance_id, given.namespace) == ("c1", "k8s.io")
    assert given.config_path == "/etc/kata-py/c.toml" and given.socket_dir == "/run/containerd/s"
    answer = dict(wire.fields(start_answer(given, ADDRESS)))
    assert answer == {1: TASK_API_VERSION, 2: ADDRESS.encode(), 3: b"ttrpc"}


def test_json_bootstrap_params_get_a_json_result():
    raw = json.dumps({"instanceId": "c1", "namespace": "default", "logLevel": "LOG_LEVEL_DEBUG",
                      "extensions": [{"value": {"@type": f"type.googleapis.com/{wire.RUNTIME_OPTIONS_TYPE}",
                                                "configPath": "/etc/kata-py/j.toml"}}]}).encode()
    given = wire.parse_start_input(raw)
    assert given.form == wire.BOOTSTRAP_JSON and given.log_level == wire.LOG_LEVEL_DEBUG
    assert given.config_path == "/etc/kata-py/j.toml"
    assert json.loads(start_answer(given, ADDRESS)) == {"version": TASK_API_VERSION, "address": ADDRESS,
                                                         "protocol": "ttrpc"}


@pytest.mark.parametrize("raw", [b"{not json", b"[1]", b'{"namespace": 3}', b"\x0a\xff"])
def test_malformed_input_is_a_clear_error(raw: bytes):
    with pytest.raises(wire.WireError):
        wire.parse_start_input(raw)
