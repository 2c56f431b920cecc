"""The pool's line-JSON protocol and the [factory] config section (issue #9)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from shim.config import DEFAULT_TEMPLATE_DIR, parse_config
from shim.errors import InvalidArgument
from shim.factory.protocol import MAX_MESSAGE, PoolError, receive, send


async def test_round_trip_and_split_reads():
    a, b = trio.testing.memory_stream_pair()
    await send(a, {"op": "take", "key": "k"})
    assert await receive(b) == {"op": "take", "key": "k"}
    await a.send_all(b'{"ok": ')
    await a.send_all(b'true}\n')
    assert await receive(b) == {"ok": True}


@pytest.mark.parametrize("wire", [b"not json\n", b"[1, 2]\n", b'{"ok": true}'])
async def test_bad_messages_are_pool_errors(wire: bytes):
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(wire)
    await a.aclose()
    with pytest.raises(PoolError):
        await receive(b)


async def test_overlong_message_is_refused():
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"x" * (MAX_MESSAGE + 10))
        with pytest.raises(PoolError, match="too long"):
            await receive(b)
        nursery.cancel_scope.cancel()


def test_factory_config_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KATA_PY_TEMPLATE_DIR", raising=False)
    default = parse_config("").factory
    assert default.template and str(default.template_path()) == DEFAULT_TEMPLATE_DIR and default.pool_socket == ""
    cfg = parse_config('[factory]\ntemplate = false\ntemplate_dir = "/t"\npool_socket = "/p.sock"\n').factory
    assert not cfg.template and str(cfg.template_path()) == "/t" and cfg.pool_socket == "/p.sock"
    with pytest.raises(InvalidArgument):
        parse_config("[factory]\ntemplate_cache_max_mb = -1\n")
    with pytest.raises(InvalidArgument):
        parse_config("[factory]\nbogus = 1\n")
