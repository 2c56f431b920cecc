"""A minimal client of the Kubernetes streaming protocol over WebSocket (`v4.channel.k8s.io`), for CRI
Exec/Attach URLs served by containerd's streaming server (pkg/cri/streaming accepts WebSocket as
well as SPDY, as kubelet's does).

Just enough RFC 6455 for a test: one connection, masked client frames, binary messages whose first
byte is the channel: 0 stdin, 1 stdout, 2 stderr, 3 error (v4: a JSON metav1.Status when the command
ends), 4 resize (JSON {"Width", "Height"}). v4 cannot half-close stdin: the command's stdin ends
with the connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc

PROTOCOL = "v4.channel.k8s.io"
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
_OP_CONT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x2, 0x8, 0x9, 0xA


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + (_varint(len(payload)) + payload if wire == 2 else payload)


def encode_exec_request(container_id: str, cmd: list[str], *, tty: bool, stdin: bool, stdout: bool,
                        stderr: bool) -> bytes:
    """runtime.v1.ExecRequest (container_id 1, cmd 2, tty 3, stdin 4, stdout 5, stderr 6): our CRI
    proto subset has no Exec, and these six fields are all it takes."""
    out = _field(1, 2, container_id.encode())
    out += b"".join(_field(2, 2, arg.encode()) for arg in cmd)
    for number, flag in ((3, tty), (4, stdin), (5, stdout), (6, stderr)):
        if flag:
            out += _field(number, 0, b"\x01")
    return out


def decode_exec_response(data: bytes) -> str:
    """runtime.v1.ExecResponse (or AttachResponse): the url (field 1)."""
    i, url = 0, ""
    while i < len(data):
        key, shift = 0, 0
        while True:
            key |= (data[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not data[i - 1] & 0x80:
                break
        n, shift = 0, 0
        if key & 7 != 2:
            raise ProtocolError(f"unexpected wire type in ExecResponse: {key}")
        while True:
            n |= (data[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not data[i - 1] & 0x80:
                break
        if key >> 3 == 1:
            url = data[i:i + n].decode()
        i += n
    return url


def encode_attach_request(container_id: str, *, stdin: bool, tty: bool, stdout: bool, stderr: bool) -> bytes:
    """runtime.v1.AttachRequest (container_id 1, stdin 2, tty 3, stdout 4, stderr 5)."""
    out = _field(1, 2, container_id.encode())
    for number, flag in ((2, stdin), (3, tty), (4, stdout), (5, stderr)):
        if flag:
            out += _field(number, 0, b"\x01")
    return out


def cri_attach_url(channel: grpc.Channel, container_id: str, *, stdin: bool, tty: bool, stdout: bool = True,
                   stderr: bool = False, timeout: float = 60) -> str:
    """CRI Attach: the streaming server's URL (AttachResponse has the url as field 1, as Exec's)."""
    call = channel.unary_unary("/runtime.v1.RuntimeService/Attach", request_serializer=lambda b: b,
                               response_deserializer=decode_exec_response)
    url: str = call(encode_attach_request(container_id, stdin=stdin, tty=tty, stdout=stdout, stderr=stderr),
                    timeout=timeout)
    return url


def cri_exec_url(channel: grpc.Channel, container_id: str, cmd: list[str], *, tty: bool, stdin: bool,
                 stdout: bool = True, stderr: bool = False, timeout: float = 60) -> str:
    """CRI Exec: the streaming server's URL for this command."""
    call = channel.unary_unary("/runtime.v1.RuntimeService/Exec", request_serializer=lambda b: b,
                               response_deserializer=decode_exec_response)
    url: str = call(encode_exec_request(container_id, cmd, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr),
                    timeout=timeout)
    return url


class ProtocolError(Exception):
    pass


@dataclass
class StreamResult:
    stdout: bytes = b""
    stderr: bytes = b""
    status: dict[str, Any] = field(default_factory=dict)  # the v4 error channel's Status
    closed: bool = False  # the server closed the connection

    @property
    def success(self) -> bool:
        return self.status.get("status") == "Success"


class ChannelConnection:
    def __init__(self, url: str, timeout: float = 120) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"expected http://host:port/... from the streaming server, got {url!r}")
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self._buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Sec-WebSocket-Protocol: {PROTOCOL}\r\nOrigin: http://{parts.netloc}\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n").decode(errors="replace")
        status, *lines = head.split("\r\n")
        if " 101 " not in status + " ":
            raise ProtocolError(f"no WebSocket upgrade: {head!r} {self._buf[:500]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise ProtocolError(f"bad Sec-WebSocket-Accept in {headers}")
        if headers.get("sec-websocket-protocol") != PROTOCOL:
            raise ProtocolError(f"server chose protocol {headers.get('sec-websocket-protocol')!r}")

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError(f"connection closed during the handshake: {self._buf!r}")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, channel: int, data: bytes) -> None:
        self._send_frame(_OP_BINARY, bytes([channel]) + data)

    def resize(self, width: int, height: int) -> None:
        self.send(RESIZE, json.dumps({"Width": width, "Height": height}).encode())

    def receive(self) -> tuple[int, bytes] | None:
        """The next message as (channel, data); None once the server closed the connection."""
        message = b""
        while True:
            try:
                b0, b1 = self._read_exact(2)
            except EOFError:
                return None
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read_exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read_exact(8))
            mask = self._read_exact(4) if b1 & 0x80 else b""
            payload = self._read_exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == _OP_CLOSE:
                try:
                    self._send_frame(_OP_CLOSE, payload[:2])
                except OSError:
                    pass
                return None
            if opcode == _OP_PING:
                self._send_frame(_OP_PONG, payload)
                continue
            if opcode == _OP_PONG:
                continue
            if opcode not in (_OP_BINARY, _OP_CONT):
                raise ProtocolError(f"unexpected opcode {opcode} (text? we asked for the binary protocol)")
            message += payload
            if b0 & 0x80:  # FIN
                if not message:
                    raise ProtocolError("a message without its channel byte")
                return message[0], message[1:]

    def close(self) -> None:
        try:
            self._send_frame(_OP_CLOSE, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


def run_stream(url: str, *, stdin: bytes = b"", resize: tuple[int, int] | None = None, stdin_delay: float = 0,
               until: bytes | None = None, timeout: float = 120) -> StreamResult:
    """Connect, send the resize (width, height), then (`stdin_delay` s later) stdin, and collect
    everything until the server closes the connection (the command's end, after its status on the
    error channel) or, with `until`, until stdout contains it."""
    result = StreamResult()
    conn = ChannelConnection(url, timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        if resize is not None:
            conn.resize(*resize)
        time.sleep(stdin_delay)
        if stdin:
            conn.send(STDIN, stdin)
        while time.monotonic() < deadline and not (until is not None and until in result.stdout):
            message = conn.receive()
            if message is None:
                result.closed = True
                break
            channel, data = message
            if channel == STDOUT:
                result.stdout += data
            elif channel == STDERR:
                result.stderr += data
            elif channel == ERROR and data:
                result.status = json.loads(data)
    finally:
        conn.close()
    return result
