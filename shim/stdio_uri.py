"""What containerd's stdio strings name (pure): a fifo, a file:// log or a binary:// logger.

containerd hands a task's stdout/stderr over as plain fifo paths (CRI, `ctr run`), or as URIs from
cio.LogFile (`file:///abs/path`) and cio.LogURI/BinaryIO (`binary:///abs/logger?arg=value`, also
`binary-v2://`, where the logger must write a byte before it closes its ready pipe). The runc shim
parses them with Go's net/url; so do we, and we refuse what it would silently misread: a host part
(`file://var/log/x` is host "var" + path "/log/x"), a relative path, a query or fragment on a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import InvalidArgument

BINARY_SCHEMES = ("binary", "binary-v2")
MAX_LOGGER_ARGS = 64


@dataclass(frozen=True)
class Fifo:
    """A fifo containerd made (or any existing file: opened for appending)."""

    path: str


@dataclass(frozen=True)
class LogFile:
    """file://: appended to, created (with its directories) when missing."""

    path: str


@dataclass(frozen=True)
class Logger:
    """binary:// — a logging binary the shim runs with the process's output on fds 3 and 4."""

    path: str
    args: tuple[str, ...]
    strict_ready: bool  # binary-v2: closing the ready pipe without a byte means it failed

    @property
    def argv(self) -> list[str]:
        return [self.path, *self.args]


Target = Fifo | LogFile | Logger


def _absolute(path: str, what: str, uri: str) -> str:
    if "\0" in path:
        raise InvalidArgument(f"{what} {uri!r}: NUL in the path")
    if not path.startswith("/"):
        raise InvalidArgument(f"{what} {uri!r}: the path must be absolute")
    return path


def logger_args(query: str, uri: str) -> tuple[str, ...]:
    """The logger's arguments, as containerd's NewBinaryCmd builds them: every key followed by its
    first value (an empty one too: `?-v` gives "-v", ""). Go walks a map (random order); we keep
    the order of the URI, which is one of Go's."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict", max_num_fields=MAX_LOGGER_ARGS)
    except ValueError as exc:  # a bad percent escape, or too many
        raise InvalidArgument(f"binary log URI {uri!r}: bad query: {exc}") from None
    first: dict[str, str] = {}
    for key, value in pairs:
        if "\0" in key or "\0" in value:
            raise InvalidArgument(f"binary log URI {uri!r}: NUL in an argument")
        first.setdefault(key, value)
    return tuple(arg for kv in first.items() for arg in kv)


def parse_output(uri: str) -> Target | None:
    """Parse one stdout/stderr string; None when empty (no stream). Raises InvalidArgument."""
    if not uri:
        return None
    if uri.startswith("/"):  # containerd's fifos: a bare path, never percent-encoded
        return Fifo(_absolute(uri, "stdio path", uri))
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise InvalidArgument(f"stdio URI {uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise InvalidArgument(f"stdio path {uri!r}: the path must be absolute")
    if scheme not in ("fifo", "file", *BINARY_SCHEMES):
        raise InvalidArgument(f"stdio URI {uri!r}: unknown STDIO scheme {scheme or '(none)'!r}"
                              " (fifo, file or binary)")
    if parts.netloc:
        raise InvalidArgument(f"stdio URI {uri!r} names host {parts.netloc!r}: write {scheme}:///absolute/path")
    if parts.fragment:
        raise InvalidArgument(f"stdio URI {uri!r}: unexpected fragment")
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidArgument(f"stdio URI {uri!r}: the path is not UTF-8") from None
    path = _absolute(path, f"{scheme} URI", uri)
    if scheme in BINARY_SCHEMES:
        return Logger(path, logger_args(parts.query, uri), strict_ready=scheme == "binary-v2")
    if parts.query:
        raise InvalidArgument(f"{scheme} URI {uri!r}: unexpected query")
    return LogFile(path) if scheme == "file" else Fifo(path)


def parse_outputs(stdout: str, stderr: str) -> tuple[Target | None, Target | None]:
    """Both output strings. A logger takes both streams, so a binary URI must be stdout's and stderr
    must be the same URI (as cio.LogURI/BinaryIO send) or empty. Raises InvalidArgument."""
    out, err = parse_output(stdout), parse_output(stderr)
    if isinstance(err, Logger) and not isinstance(out, Logger):
        raise InvalidArgument(f"binary log URI {stderr!r} for stderr only: a logger takes stdout and stderr")
    if isinstance(out, Logger) and stderr and stderr != stdout:
        raise InvalidArgument(f"binary log URI {stdout!r}: stderr must be the same URI, not {stderr!r}")
    return out, err
