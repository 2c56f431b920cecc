"""Guest CID choice (vmm/vsock.py): the whole id hashed, reserved CIDs never chosen, and QEMU started
again with the next candidate only when vhost-vsock says the CID is taken."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from vmm.config import SerialChannel, VmConfig, VsockChannel
from vmm.errors import VmStartError
from vmm.hypervisor import VmExit
from vmm.vsock import CID_ATTEMPTS, CID_MAX, CID_MIN, cid_in_use, guest_cid, read_token, start_with_free_cid

IN_USE = ("qemu-system-x86_64: -device vhost-vsock-pci,id=vsock0,guest-cid=7: "
          "vhost-vsock: unable to set guest cid: Address already in use")


def test_ids_that_differ_late_get_different_cids() -> None:
    # the old derivation used the first 8 bytes only: these all collided
    ids = ["web-1", "web-2", "web-10", "0123456789abcdef-a", "0123456789abcdef-b", "a" * 64, "a" * 63 + "b"]
    assert len({guest_cid(i) for i in ids}) == len(ids)


def test_cid_is_stable_and_attempts_differ() -> None:
    assert guest_cid("web-1") == guest_cid("web-1") == guest_cid("web-1", 0)
    assert len({guest_cid("web-1", a) for a in range(CID_ATTEMPTS)}) == CID_ATTEMPTS
    with pytest.raises(ValueError):
        guest_cid("web-1", -1)


def test_range_bounds() -> None:
    assert (CID_MIN, CID_MAX) == (3, 2**32 - 2)  # 0 hypervisor, 1 local, 2 host; 2**32-1 is CID_ANY


@given(st.text(max_size=200), st.integers(min_value=0, max_value=1000))
def test_cid_never_reserved(sandbox_id: str, attempt: int) -> None:
    assert CID_MIN <= guest_cid(sandbox_id, attempt) <= CID_MAX


@pytest.mark.parametrize(("tail", "taken"), [
    (IN_USE, True),
    (IN_USE + "\n\n", True),
    ("booting\n" + IN_USE, True),
    # an earlier attempt's refusal still in the appended console log: this failure is another one
    (IN_USE + "\nqemu-system-x86_64: -device vhost-vsock-pci: vhost-vsock: failed to open vhost device: "
              "Permission denied", False),
    ("qemu-system-x86_64: -device vhost-vsock-pci: vhost-vsock: unable to set guest cid: Invalid argument", False),
    ("", False),
])
def test_cid_in_use_reads_qemus_last_words(tail: str, taken: bool) -> None:
    assert cid_in_use(tail) is taken


class FakeVm:
    """Fails start() like QemuHypervisor does: exit_info set, on_exit called, then VmStartError."""

    def __init__(self, config: VmConfig, taken: set[int], other_error: bool, calls: list[VmExit]) -> None:
        self.config = config
        self.on_exit = calls.append
        self.exit_info: VmExit | None = None
        self._taken, self._other = taken, other_error

    async def start(self, nursery: trio.Nursery) -> None:
        await trio.lowlevel.checkpoint()
        assert isinstance(self.config.agent, VsockChannel)
        cid = self.config.agent.guest_cid
        if cid in self._taken or self._other:
            self.exit_info = VmExit(1, "start-failed")
            if self.on_exit is not None:
                self.on_exit(self.exit_info)
            raise VmStartError("QEMU exited with status 1 during start",
                               IN_USE if cid in self._taken else "qemu: something else")


def _cfg(tmp_path: Path, agent: VsockChannel | SerialChannel) -> VmConfig:
    return VmConfig(state_dir=tmp_path / "sb", agent=agent)


async def test_taken_cids_are_skipped(tmp_path: Path, nursery: trio.Nursery) -> None:
    made: list[FakeVm] = []
    exits: list[VmExit] = []
    taken = {guest_cid("web-1", 0), guest_cid("web-1", 1)}

    def make(c: VmConfig) -> FakeVm:
        made.append(FakeVm(c, taken, False, exits))
        return made[-1]

    vm = await start_with_free_cid(make, _cfg(tmp_path, VsockChannel(guest_cid=7)), nursery, "web-1")
    assert vm is made[-1] and len(made) == 3
    assert vm.config.agent == VsockChannel(guest_cid=guest_cid("web-1", 2))
    assert exits == []  # the refused attempts were never the sandbox's VM: no exit reported
    assert vm.on_exit == exits.append  # the hook is back on the VM that runs
    token = read_token(tmp_path / "sb" / "agent-token")  # written before QEMU reads it
    assert (tmp_path / "sb" / "agent-token").stat().st_mode & 0o777 == 0o600
    assert len(token) == 64


async def test_gives_up_after_attempts_and_reports_the_exit(tmp_path: Path, nursery: trio.Nursery) -> None:
    exits: list[VmExit] = []
    taken = {guest_cid("x", a) for a in range(CID_ATTEMPTS)}
    with pytest.raises(VmStartError, match="Address already in use"):
        await start_with_free_cid(lambda c: FakeVm(c, taken, False, exits),
                                  _cfg(tmp_path, VsockChannel(guest_cid=7)), nursery, "x")
    assert [e.reason for e in exits] == ["start-failed"]  # once, for the last one, as a plain start


async def test_other_failures_are_not_retried(tmp_path: Path, nursery: trio.Nursery) -> None:
    made: list[FakeVm] = []
    exits: list[VmExit] = []

    def make(c: VmConfig) -> FakeVm:
        made.append(FakeVm(c, set(), True, exits))
        return made[-1]

    with pytest.raises(VmStartError, match="something else"):
        await start_with_free_cid(make, _cfg(tmp_path, VsockChannel(guest_cid=7)), nursery, "x")
    assert len(made) == 1 and len(exits) == 1


async def test_serial_channel_starts_once_without_a_token(tmp_path: Path, nursery: trio.Nursery) -> None:
    made: list[FakeVm] = []

    class SerialVm(FakeVm):
        async def start(self, nursery: trio.Nursery) -> None:
            await trio.lowlevel.checkpoint()

    def make(c: VmConfig) -> FakeVm:
        made.append(SerialVm(c, set(), False, []))
        return made[-1]

    cfg = _cfg(tmp_path, SerialChannel())
    vm = await start_with_free_cid(make, cfg, nursery, "x")
    assert made == [vm] and vm.config is cfg
    assert not (tmp_path / "sb").exists()


def test_replace_keeps_other_channel_fields() -> None:
    ch = VsockChannel(guest_cid=9, port=2000, token_file=Path("/t"))
    assert dataclasses.replace(ch, guest_cid=10) == VsockChannel(10, 2000, Path("/t"))
