"""The vsock agent token: written and read by the host (vmm/vsock.py), read by the guest
(agent/channel.py), handed over by QEMU's fw_cfg and never on a command line; templates stay off with
vsock so no clone inherits another sandbox's token."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent import channel
from agent_client.transport import VsockTransport
from shim.factory.key import NoTemplate, canonical_config
from vmm.accel import AccelChoice
from vmm.cmdline import AGENT_TOKEN_FW_CFG, build_argv, kernel_cmdline
from vmm.config import VmConfig, VsockChannel
from vmm.errors import InvalidVmConfig, VmmError
from vmm.vsock import new_token, read_token, write_token

S = Path("/run/kata-py/sandboxes/sb1")
CFG = VmConfig(state_dir=S, kernel=Path("/g/vmlinux"), initrd=Path("/g/initrd.img"),
               rootfs=Path("/g/rootfs.erofs"), agent=VsockChannel(guest_cid=1234))


def test_tokens_are_fresh_and_both_ends_accept_the_format(tmp_path: Path) -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for t in tokens:  # what the host writes is what the guest and the transport accept
        (tmp_path / "raw").write_bytes(t)
        assert channel.read_token(str(tmp_path / "raw")) == t
        VsockTransport(3, token=t)


def test_write_token_is_private_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "state" / "agent-token"
    write_token(path, b"a" * 64)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)  # a stale, readable file is not reused: its mode would stay
    write_token(path, b"b" * 64)
    assert path.read_bytes() == b"b" * 64 and read_token(path) == b"b" * 64
    assert path.stat().st_mode & 0o777 == 0o600


def test_write_token_never_follows_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path = tmp_path / "agent-token"
    path.symlink_to(victim)
    write_token(path, b"c" * 64)  # the link itself is replaced
    assert victim.read_text() == "keep" and not path.is_symlink()
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(OSError):
        read_token(path)


@pytest.mark.parametrize("bad", [b"", b"a" * 63, b"a" * 65, b"A" * 64, b"g" * 64, b"a" * 63 + b"\n"])
def test_malformed_tokens_are_refused_everywhere(tmp_path: Path, bad: bytes) -> None:
    path = tmp_path / "t"
    path.write_bytes(bad)
    with pytest.raises(VmmError):
        read_token(path)
    with pytest.raises(VmmError):
        write_token(tmp_path / "u", bad)
    with pytest.raises(ValueError):
        channel.read_token(str(path))
    with pytest.raises(ValueError):
        VsockTransport(3, token=bad)
    with pytest.raises(ValueError):
        channel.AuthenticatedListener(socket.socket(), "/nowhere", bad, lambda peer: True)


def test_guest_without_a_token_says_why(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no agent token at .*qemu_fw_cfg"):
        channel.read_token(str(tmp_path / "missing"))


def test_guest_reads_the_fw_cfg_file_qemu_is_given() -> None:
    assert channel.TOKEN_PATH == f"/sys/firmware/qemu_fw_cfg/by_name/{AGENT_TOKEN_FW_CFG}/raw"


def test_token_reaches_qemu_as_a_file_not_on_a_command_line(tmp_path: Path) -> None:
    argv = build_argv(CFG, AccelChoice("tcg", "test"))
    i = argv.index("-fw_cfg")
    assert argv[i + 1] == f"name={AGENT_TOKEN_FW_CFG},file={S}/agent-token"
    assert "string=" not in argv[i + 1]
    assert "token" not in kernel_cmdline(CFG)  # the guest's /proc/cmdline is readable by all its users
    custom = VmConfig(state_dir=S, agent=VsockChannel(guest_cid=5, token_file=Path("/x,y/t")))
    assert f"name={AGENT_TOKEN_FW_CFG},file=/x,,y/t" in build_argv(custom, AccelChoice("tcg", "test"))


@pytest.mark.parametrize("cid", [0, 1, 2, 2**32 - 1, 2**32])
def test_reserved_cids_are_rejected(cid: int) -> None:
    with pytest.raises(InvalidVmConfig, match="reserved"):
        build_argv(VmConfig(state_dir=S, agent=VsockChannel(guest_cid=cid)), AccelChoice("tcg", "test"))


def test_templates_stay_off_with_vsock() -> None:
    # a template's guest read its token (and kept its CID) at boot: every clone would share them
    with pytest.raises(NoTemplate):
        canonical_config(CFG)


def test_peer_check_wants_the_host_from_a_privileged_port() -> None:
    host = socket.VMADDR_CID_HOST
    assert channel.vsock_peer_ok((host, 1023)) and channel.vsock_peer_ok((host, 1))
    assert not channel.vsock_peer_ok((host, 1024))
    assert not channel.vsock_peer_ok((host, 49152))
    assert not channel.vsock_peer_ok((1, 700))  # this guest's own processes (vsock loopback)
    assert not channel.vsock_peer_ok((3, 700))


def test_transport_refuses_unprivileged_source_ports() -> None:
    with pytest.raises(ValueError, match="privileged"):
        VsockTransport(3, token=new_token(), source_ports=range(1000, 1100))
    with pytest.raises(ValueError):
        VsockTransport(3, token=new_token(), source_ports=())
