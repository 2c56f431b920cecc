"""The console log's size bound: a guest may write to its serial console without end (#14).

QEMU appends the guest's serial console and its own stderr to `<state>/console.log` (on /run, a
tmpfs shared with containerd and systemd). Rather than a ring QEMU would keep (gone with QEMU, which
is when its tail matters most) the file stays, and the owner of the VM frees all but its last
`keep` bytes now and then by punching a hole at its head (fallocate PUNCH_HOLE|KEEP_SIZE). Every
writer appends (O_APPEND), so nothing at or after the kept offset is ever touched: no byte of the
tail is lost or raced, readers that seek from the end see the same file, and the memory or disk used
stays under `keep` plus what the guest writes between two checks.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

CONSOLE_KEEP_BYTES = 1 << 20  # the tail kept: the last MiB of a console says why a guest died
CONSOLE_CHECK_S = 1.0  # a guest's serial console under TCG writes well under 10 MB/s
_PAGE = 4096  # holes in whole pages: a partial one would be written as zeros, not freed

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def hole_to_punch(size: int, freed_to: int, keep: int) -> tuple[int, int] | None:
    """(offset, length) of the next hole for a file of `size` bytes whose first `freed_to` are
    already freed, keeping the last `keep`; None while there is less than a page more to free."""
    end = max(0, size - keep) // _PAGE * _PAGE
    if end - freed_to < _PAGE:
        return None
    return freed_to, end - freed_to


class ConsoleBound:
    """Frees the head of one console log; `check()` is cheap (one fstat) and never raises."""

    def __init__(self, path: Path, keep: int = CONSOLE_KEEP_BYTES) -> None:
        self.path = path
        self.keep = keep
        self.freed_to = 0  # bytes at the head already punched out
        self.supported = True  # False once the filesystem refused holes (then the file just grows)

    def check(self) -> int:
        """Punch what is over the bound; returns the bytes freed now (0 if nothing or unsupported)."""
        if not self.supported:
            return 0
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return 0  # not made yet, or gone with the state dir
        try:
            hole = hole_to_punch(os.fstat(fd).st_size, self.freed_to, self.keep)
            if hole is None:
                return 0
            if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, *hole) != 0:
                if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
                    self.supported = False
                return 0
            self.freed_to = hole[0] + hole[1]
            return hole[1]
        finally:
            os.close(fd)
