"""vsock agent channel, host side: each sandbox's guest CID, and the token only its shim knows.

CID. QEMU's command line is world-readable, so the CID is no secret; what matters is that two
sandboxes never want the same one. `guest_cid` hashes the *whole* sandbox id (ids such as `web-1` and
`web-2` differ late), salted with an attempt number so that a taken CID has a next candidate, and
`start_with_free_cid` starts QEMU again with the next candidate when vhost-vsock says the CID is taken
(by another VM on this host, or by the host itself when it is a vsock guest too).

Token. A fresh random secret per sandbox, written 0600 into the sandbox's 0700 state dir and given to
the guest by QEMU as the fw_cfg file `opt/io.kata-py/agent-token` (vmm/cmdline.py): the file's path is
on QEMU's command line, its content is not. The agent serves a vsock connection only if it comes from
a privileged host port and starts with this token (agent/channel.py); the host side sends it
(agent_client/transport.py). The format is fixed (64 lowercase hex digits) so that both ends can
refuse anything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from vmm.config import VSOCK_CID_MAX, VSOCK_CID_MIN, VmConfig, VsockChannel
from vmm.errors import VmmError, VmStartError
from vmm.hypervisor import ExitCallback, VmExit

log = logging.getLogger(__name__)

# QEMU's vhost-vsock refuses the same ("guest-cid property must be greater than 2" / "must be a
# 32-bit number"): 0-2 are reserved, 2**32 - 1 is VMADDR_CID_ANY.
CID_MIN = VSOCK_CID_MIN
CID_MAX = VSOCK_CID_MAX
CID_ATTEMPTS = 4  # a collision in 2**32 is rare; four in a row means something else is wrong
TOKEN_HEX_DIGITS = 64
_TOKEN_RE = re.compile(rb"[0-9a-f]{%d}" % TOKEN_HEX_DIGITS)


def guest_cid(sandbox_id: str, attempt: int = 0) -> int:
    """The guest CID to try for `sandbox_id` on its `attempt`-th try (0 first). Pure and stable."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    digest = hashlib.sha256(f"kata-py vsock cid\0{attempt}\0{sandbox_id}".encode()).digest()
    return CID_MIN + int.from_bytes(digest[:8], "big") % (CID_MAX - CID_MIN + 1)


def cid_in_use(console_tail: str) -> bool:
    """True when QEMU's last words are vhost-vsock refusing a CID someone else holds.

    QEMU 7.2 (hw/virtio/vhost-vsock.c) says "vhost-vsock: unable to set guest cid: Address already
    in use" (the kernel's EADDRINUSE) and exits. Only the last line counts: the console log is
    appended to, so an earlier attempt's refusal may still be in the tail.
    """
    lines = [line for line in console_tail.splitlines() if line.strip()]
    return bool(lines) and "unable to set guest cid" in lines[-1] and "Address already in use" in lines[-1]


def new_token() -> bytes:
    """A fresh token: 32 random bytes as 64 lowercase hex digits (ASCII)."""
    return secrets.token_hex(TOKEN_HEX_DIGITS // 2).encode()


def write_token(path: Path, token: bytes) -> None:
    """Write `token` to `path` (0600, replacing a stale file, never following a symlink).

    Raises OSError; VmmError for a malformed token.
    """
    _check(token, str(path))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a previous QEMU's, or anything else: O_EXCL below must create it anew
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, token)
    finally:
        os.close(fd)


def read_token(path: Path) -> bytes:
    """The token `write_token` wrote. Raises OSError; VmmError if the file holds anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        token = os.read(fd, TOKEN_HEX_DIGITS + 1)
    finally:
        os.close(fd)
    _check(token, str(path))
    return token


def _check(token: bytes, where: str) -> None:
    if not _TOKEN_RE.fullmatch(token):
        raise VmmError(f"agent token {where}: not {TOKEN_HEX_DIGITS} lowercase hex digits")


class StartableVm(Protocol):
    """What `start_with_free_cid` needs of a VM (QemuHypervisor has it)."""

    config: VmConfig
    on_exit: ExitCallback | None
    exit_info: VmExit | None

    async def start(self, nursery: trio.Nursery) -> None: ...


V = TypeVar("V", bound=StartableVm)


async def start_with_free_cid(make_vm: Callable[[VmConfig], V], cfg: VmConfig, nursery: trio.Nursery,
                              sandbox_id: str, attempts: int = CID_ATTEMPTS) -> V:
    """Start the VM `make_vm` makes of `cfg` (its watcher in `nursery`) and return it.

    With a vsock agent channel: write a fresh agent token first, and while vhost-vsock refuses the
    CID as taken, start another VM with the next candidate CID of `sandbox_id` (at most `attempts`
    VMs; the returned VM's `config` says which CID it got). A refused attempt's `on_exit` hook is not
    called (that VM never was the sandbox's); the last failure's is, as a plain start would.
    With a serial channel this is just `make_vm(cfg).start(nursery)`.

    Raises what the VM's start raises (VmStartError, InvalidVmConfig), OSError or VmmError if the
    token cannot be written.
    """
    if not isinstance(cfg.agent, VsockChannel):
        vm = make_vm(cfg)
        await vm.start(nursery)
        return vm
    token_file = cfg.agent.token_file_in(cfg.state_dir)
    await trio.to_thread.run_sync(write_token, token_file, new_token())
    for attempt in range(attempts):
        channel = dataclasses.replace(cfg.agent, guest_cid=guest_cid(sandbox_id, attempt))
        try_cfg = dataclasses.replace(cfg, agent=channel)
        vm = make_vm(try_cfg)
        hook, vm.on_exit = vm.on_exit, None
        try:
            await vm.start(nursery)
        except VmStartError as exc:
            if attempt + 1 < attempts and cid_in_use(exc.console_tail):
                log.warning("sandbox %s: vsock guest cid %d is taken, trying another", sandbox_id,
                            channel.guest_cid)
                continue
            if hook is not None and vm.exit_info is not None:
                hook(vm.exit_info)
            raise
        # No checkpoint since start() returned: the VM cannot have exited unobserved in between.
        vm.on_exit = hook
        return vm
    raise AssertionError("unreachable: the last attempt returns or raises")
