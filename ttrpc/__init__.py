"""ttrpc for Python: a sans-IO codec plus a trio server and client (containerd/ttrpc v1.1 wire format)."""

from .client import Client, open_client, open_client_on_stream
from .codec import MAX_MESSAGE_LENGTH, Frame, FrameDecoder, MessageType, OversizedFrame, encode_frame
from .errors import (
    ClosedError,
    Code,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StatusError,
    TtrpcError,
)
from .server import Method, RequestContext, Server, bind_unix_socket, listener_from_socket

__all__ = [
    "MAX_MESSAGE_LENGTH", "Client", "ClosedError", "Code", "Frame", "FrameDecoder", "LocalProtocolError",
    "MessageType", "Method", "OversizedFrame", "ProtocolError", "RemoteProtocolError", "RequestContext",
    "Server", "StatusError", "TtrpcError", "bind_unix_socket", "encode_frame", "listener_from_socket",
    "open_client", "open_client_on_stream",
]
