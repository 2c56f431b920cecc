"""Legacy xtables modules are loaded for the first container that may use them, and only then."""

from __future__ import annotations

from dataclasses import dataclass

from agent.sandbox import LEGACY_NETFILTER_MODULES, Sandbox, may_use_netfilter


def spec(*caps: str, kind: str = "bounding") -> dict:
    return {"process": {"args": ["sh"], "capabilities": {kind: list(caps)}}}


def test_net_admin_is_read_from_effective_or_bounding():
    assert may_use_netfilter(spec("CAP_CHOWN", "CAP_NET_ADMIN"))
    assert may_use_netfilter(spec("CAP_NET_ADMIN", kind="effective"))
    assert not may_use_netfilter(spec("CAP_NET_RAW", "CAP_CHOWN"))
    assert not may_use_netfilter(spec("CAP_NET_ADMIN", kind="ambient"))
    for odd in ({}, {"process": None}, {"process": {"capabilities": ["CAP_NET_ADMIN"]}},
                {"process": {"capabilities": {"bounding": "CAP_NET_ADMIN"}}}):
        assert not may_use_netfilter(odd)


@dataclass
class Done:
    code: int = 0
    stderr: bytes = b""


class RecordingReaper:
    def __init__(self, fail: Exception | None = None) -> None:
        self.runs: list[list[str]] = []
        self.fail = fail

    def run(self, argv: list[str], **kwargs: object) -> Done:
        self.runs.append(argv)
        if self.fail:
            raise self.fail
        return Done(1, b"modprobe: FATAL: Module ebtable_nat not found")


def test_loaded_once_for_the_first_net_admin_container_never_fatal():
    reaper = RecordingReaper()
    sandbox = Sandbox("/r", containers=None, reaper=reaper, guest=True)  # type: ignore[arg-type]
    sandbox.prepare_for(spec("CAP_CHOWN"))
    assert reaper.runs == []  # a plain container does not pay for it
    sandbox.prepare_for(spec("CAP_NET_ADMIN"))
    sandbox.prepare_for(spec("CAP_NET_ADMIN"))
    assert reaper.runs == [["modprobe", "-a", "-q", *LEGACY_NETFILTER_MODULES]]
    broken = Sandbox("/r", containers=None, reaper=RecordingReaper(OSError("no modprobe")), guest=True)  # type: ignore[arg-type]
    broken.prepare_for(spec("CAP_NET_ADMIN"))  # logged, not raised
    host = Sandbox("/r", containers=None, reaper=reaper, guest=False)  # type: ignore[arg-type]
    host.prepare_for(spec("CAP_NET_ADMIN"))  # never on a host running the agent for tests
    assert len(reaper.runs) == 1
