"""ttrpc for Python: a sans-IO codec plus a trio server and client (containerd/ttrpc v1.1 wire format).

Names are imported on first use (PEP 562), so `ttrpc.sockets` or `ttrpc.codec` alone do not pay for trio.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "client", "open_client": "client", "open_client_on_stream": "client",
    "MAX_MESSAGE_LENGTH": "codec", "Frame": "codec", "FrameDecoder": "codec", "MessageType": "codec",
    "OversizedFrame": "codec", "encode_frame": "codec",
    "ClosedError": "errors", "Code": "errors", "LocalProtocolError": "errors", "ProtocolError": "errors",
    "RemoteProtocolError": "errors", "StatusError": "errors", "TtrpcError": "errors",
    "Method": "server", "RequestContext": "server", "Server": "server", "listener_from_socket": "server",
    "bind_unix_socket": "sockets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'ttrpc' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
