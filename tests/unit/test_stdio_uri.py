"""containerd's stdio strings, parsed as the runc shim reads them and refused where it would misread them."""

from __future__ import annotations

import pytest

from shim.errors import InvalidArgument
from shim.stdio_uri import Fifo, LogFile, Logger, parse_output, parse_outputs


@pytest.mark.parametrize("uri, expected", [
    ("", None),
    ("/run/containerd/fifo/abc/c1-stdout", Fifo("/run/containerd/fifo/abc/c1-stdout")),
    ("/run/with:colon%20and-percent", Fifo("/run/with:colon%20and-percent")),  # a bare path is never decoded
    ("fifo:///run/x", Fifo("/run/x")),
    ("file:///var/log/c1.log", LogFile("/var/log/c1.log")),
    ("file:///var/log/with%20space.log", LogFile("/var/log/with space.log")),
    ("FILE:///var/log/upper.log", LogFile("/var/log/upper.log")),
    ("binary:///usr/bin/logger", Logger("/usr/bin/logger", (), strict_ready=False)),
    ("binary:///usr/bin/logger?arg=1", Logger("/usr/bin/logger", ("arg", "1"), strict_ready=False)),
    ("binary-v2:///opt/l?-v", Logger("/opt/l", ("-v", ""), strict_ready=True)),
    # every key once, with its first value, in the URI's order; values decoded as Go's ParseQuery does
    ("binary:///l?dir=%2Ftmp%2Fa+b&n=1&dir=/other&x=a%26b",
     Logger("/l", ("dir", "/tmp/a b", "n", "1", "x", "a&b"), strict_ready=False)),
])
def test_parse_output(uri: str, expected: object):
    assert parse_output(uri) == expected


@pytest.mark.parametrize("uri, message", [
    ("relative/fifo", "must be absolute"),
    ("file://var/log/c1.log", "names host 'var'"),  # Go reads host "var", path "/log/c1.log"
    ("file:relative.log", "must be absolute"),
    ("file:///var/log/x?rotate=1", "unexpected query"),
    ("file:///var/log/x#frag", "unexpected fragment"),
    ("file:///var/%00log", "NUL"),
    ("file:///var/%ff", "not UTF-8"),
    ("binary://host/usr/bin/logger", "names host 'host'"),
    ("binary:logger", "must be absolute"),
    ("binary:///l?a=%00", "NUL"),
    ("binary:///l?" + "&".join(f"k{i}=v" for i in range(100)), "bad query"),
    ("npipe:///x", "unknown STDIO scheme 'npipe'"),
    ("http://example.com/x", "unknown STDIO scheme 'http'"),
])
def test_parse_output_refusals(uri: str, message: str):
    with pytest.raises(InvalidArgument, match=message) as caught:
        parse_output(uri)
    assert "invalid argument" in str(caught.value)  # containerd's errdefs class for the code


def test_a_logger_takes_both_streams():
    uri = "binary:///usr/bin/logger?a=b"
    out, err = parse_outputs(uri, uri)  # what cio.LogURI / BinaryIO send
    assert out == err == Logger("/usr/bin/logger", ("a", "b"), strict_ready=False)
    assert parse_outputs(uri, "") == (out, None)  # a terminal: no stderr
    with pytest.raises(InvalidArgument, match="stderr must be the same URI"):
        parse_outputs(uri, "/run/fifo/stderr")
    with pytest.raises(InvalidArgument, match="for stderr only"):
        parse_outputs("/run/fifo/stdout", uri)
    assert parse_outputs("file:///a.log", "file:///a.log") == (LogFile("/a.log"), LogFile("/a.log"))
