"""Confine QEMU between fork and exec: capabilities, no_new_privs and a seccomp filter of our own.

QEMU runs as root, exports host directories to an untrusted guest over 9p (security_model=none:
files are created and chowned as the guest says) and parses guest-controlled device state. What
it keeps:

- Capabilities: only KEPT_CAPS (the reason for each is next to it), in the effective, permitted
  and bounding sets; inheritable and ambient empty. QEMU runs as uid 0, so at exec the kernel gives
  it permitted = effective = bounding (no file capabilities are involved), and no_new_privs stops
  any later exec (QEMU's `-sandbox spawn=deny` forbids those anyway) from gaining more.
- no_new_privs: setuid/setgid bits and file capabilities mean nothing to QEMU or what it could exec.
- A seccomp filter (classic BPF; stacks with QEMU's own `-sandbox` filter, whichever answer is
  stricter wins) so that neither the guest through 9p nor a compromised QEMU can make a host file
  setuid/setgid-executable or a device node: chmod/fchmod/fchmodat/fchmodat2 with S_ISUID, or with
  S_ISGID and S_IXGRP together; mknod/mknodat of a character or block device, or with those mode
  bits; open/openat/creat that may create a file (O_CREAT, O_TMPFILE) with those bits -> EPERM.
  openat2 (its mode sits behind a pointer seccomp cannot read) and io_uring (which would open files
  without these syscalls) -> ENOSYS: glibc and QEMU then use openat and epoll. Any other
  architecture or the x32 ABI kills the process.

  S_ISGID: a syscall does not say whether its target is a directory, where S_ISGID only makes new
  entries inherit the group. The kernel's own rule for "this file is setgid" is S_ISGID together
  with S_IXGRP (S_ISGID alone marked mandatory locking and grants nothing on exec), so only that
  pair is refused. A chmod to such a mode without file-type bits is what QEMU's 9p server does
  right after it created a directory in a setgid parent (it applies the guest's mode, masked to
  07777; a guest's own chmod carries the type bits): that chmod is skipped and reports success,
  since mkdirat already gave the directory S_ISGID by inheritance and, with QEMU's umask 0, the
  guest's permission bits. So directories in setgid directories (Debian's /var/local, Kubernetes
  fsGroup volumes) keep working; an explicit `chmod g+s` of a directory on a share is refused.

The pure part (cap_sets, seccomp_program) is tested on its own; Confinement precomputes every
struct and ctypes function in the parent, so the child between fork and exec only makes calls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# linux/capability.h
CAP_NAMES: Mapping[int, str] = dict(enumerate((
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE")))
CAP = {name: number for number, name in CAP_NAMES.items()}
MAX_CAP = 63  # capabilities are two 32-bit words; the kernel's cap_last_cap is lower

# What QEMU keeps, and why. Everything else QEMU does needs no capability: /dev/kvm and
# /dev/vhost-vsock are root's devices (owner access), taps arrive as open fds, the template RAM and
# state files, the console, sockets and pid file are in root's 0700 directories, no hugepages, no
# mlock, no raised rlimits. Not kept, on purpose: MKNOD (guest device nodes on a share), SETFCAP
# (file capabilities in security.capability), FSETID (writes and chowns by QEMU clear setuid/
# setgid bits as for any user; 9p's none model never needs to keep them), SETUID/SETGID (the 9p
# local backend chowns with fchownat; only its proxy helper switches ids), SYS_ADMIN (trusted.*
# xattrs, mounts), DAC_READ_SEARCH (DAC_OVERRIDE already covers reading and searching; 9p opens
# no file handles), NET_ADMIN, SYS_PTRACE and the rest. Each kept one was checked by dropping it:
# guest file operations on a shared volume then fail (tests/e2e/test_qemu_confinement.py).
KEPT_CAPS: Mapping[int, str] = {
    # 9p creates each file as QEMU and then chowns it to the guest's uid/gid (security_model=none
    # ignores a failed chown silently: the guest would see every new file owned by root).
    CAP["CHOWN"]: "9p: chown new and existing files to the uid/gid the guest names",
    # Files the guest created belong to the guest's users, often 0600/0700: QEMU must open,
    # list and write them whatever their owner and mode (the guest kernel checks access itself).
    CAP["DAC_OVERRIDE"]: "9p: read/write/search guest-owned files and directories regardless of mode",
    # chmod, utimensat with explicit times and unlink in sticky directories (/tmp) of files QEMU
    # does not own (every file the guest created and chowned).
    CAP["FOWNER"]: "9p: chmod, set times on, and remove in sticky dirs files owned by guest users",
}


@dataclass(frozen=True)
class CapSets:
    """The capability state to set: the bounding set entries to drop, and capset's two data words."""

    drop_bounding: tuple[int, ...]
    effective: tuple[int, int]  # = permitted
    inheritable: tuple[int, int]

    @property
    def mask(self) -> int:
        return self.effective[0] | self.effective[1] << 32


def cap_sets(kept: Iterable[int]) -> CapSets:
    """What to drop from the bounding set and what capset sets, to keep exactly `kept`."""
    keep = set(kept)
    if not keep <= set(range(MAX_CAP + 1)):
        raise ValueError(f"unknown capabilities {sorted(keep - set(range(MAX_CAP + 1)))}")
    mask = sum(1 << c for c in keep)
    return CapSets(tuple(c for c in range(MAX_CAP + 1) if c not in keep),
                   (mask & 0xFFFFFFFF, mask >> 32), (0, 0))


def cap_mask(kept: Iterable[int]) -> int:
    """The /proc/<pid>/status CapEff/CapPrm/CapBnd value of a process keeping `kept`."""
    return sum(1 << c for c in set(kept))


# ---- seccomp program (classic BPF over struct seccomp_data) ---------------------------------------
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_MODE_FILTER = 2
# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little endian)
OFF_NR, OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i  # low 32 bits of args[i]: mode_t and open flags are 32-bit (umode_t 16)


# x86_64 syscall numbers
NR = {"open": 2, "chmod": 90, "fchmod": 91, "creat": 85, "mknod": 133, "mknodat": 259, "openat": 257,
      "fchmodat": 268, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
      "openat2": 437, "fchmodat2": 452}
O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE; O_TMPFILE adds O_DIRECTORY
SETGID_EXEC = stat.S_ISGID | stat.S_IXGRP
S_IFMT = 0o170000

# BPF opcodes
_LD_W_ABS = 0x20
_JMP_JA, _JMP_JEQ_K, _JMP_JGE_K, _JMP_JSET_K = 0x05, 0x15, 0x35, 0x45
_ALU_AND_K = 0x54
_RET_K = 0x06
_MISC_TAX, _MISC_TXA = 0x07, 0x87

# (syscall, index of its mode argument)
_CHMODS = (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("fchmodat2", 2))
# (syscall, index of its mode argument, index of its flags argument or None: always creates)
_CREATES = (("creat", 1, None), ("open", 2, 1), ("openat", 3, 2))
_MKNODS = (("mknod", 1), ("mknodat", 2))
_ENOSYS = ("openat2", "io_uring_setup", "io_uring_enter", "io_uring_register")


Insn = tuple[int, int, int, int]  # code, jt, jf, k


def seccomp_program() -> list[Insn]:
    """The filter as (code, jt, jf, k) instructions (see the module docstring for what it refuses)."""
    # Assembled with labels; jumps are forward only (jt/jf are unsigned 8-bit offsets).
    ops: list[tuple] = [
        ("ld", OFF_ARCH), ("jeq", AUDIT_ARCH_X86_64, None, "kill"),
        ("ld", OFF_NR), ("jge", X32_SYSCALL_BIT, "kill", None),
    ]
    for name, *_ in (*_CHMODS, *_CREATES, *_MKNODS):
        ops.append(("jeq", NR[name], name, None))
    for name in _ENOSYS:
        ops.append(("jeq", NR[name], "enosys", None))
    ops.append(("ret", SECCOMP_RET_ALLOW))
    for name, mode_arg in _CHMODS:
        ops += [("label", name), ("ld", _arg_lo(mode_arg)), ("ja", "chmod_mode")]
    for name, mode_arg, flags_arg in _CREATES:
        ops.append(("label", name))
        if flags_arg is not None:
            ops += [("ld", _arg_lo(flags_arg)), ("jset", O_CREAT | O_TMPFILE_BIT, None, "allow")]
        ops += [("ld", _arg_lo(mode_arg)), ("ja", "create_mode")]
    for name, mode_arg in _MKNODS:
        ops += [("label", name), ("ld", _arg_lo(mode_arg)), ("tax",), ("and", S_IFMT),
                ("jeq", stat.S_IFCHR, "eperm", None), ("jeq", stat.S_IFBLK, "eperm", None),
                ("txa",), ("ja", "create_mode")]  # a fifo, socket or file: its mode bits
    ops += [
        # chmod: A = the new mode. A setgid-executable mode without file-type bits is how the 9p
        # server sets the mode of a directory it just created (the Linux 9p client asks for
        # S_ISGID in a setgid parent, and the kernel already gave the directory that bit by
        # inheritance): skipped with success, the directory keeps what mkdirat gave it. With
        # type bits (a guest's setattr: the Linux client always sends them) it is refused.
        ("label", "chmod_mode"), ("tax",), ("jset", stat.S_ISUID, "eperm", None), ("and", SETGID_EXEC),
        ("jeq", SETGID_EXEC, None, "allow"), ("txa",), ("and", S_IFMT), ("jeq", 0, "skip", "eperm"),
        # creation: A = the mode of a new non-directory
        ("label", "create_mode"), ("jset", stat.S_ISUID, "eperm", None), ("and", SETGID_EXEC),
        ("jeq", SETGID_EXEC, "eperm", "allow"),
        ("label", "allow"), ("ret", SECCOMP_RET_ALLOW),
        ("label", "skip"), ("ret", SECCOMP_RET_ERRNO | 0),  # errno 0: "succeeds", not executed
        ("label", "eperm"), ("ret", SECCOMP_RET_ERRNO | errno.EPERM),
        ("label", "enosys"), ("ret", SECCOMP_RET_ERRNO | errno.ENOSYS),
        ("label", "kill"), ("ret", SECCOMP_RET_KILL_PROCESS)]
    return _assemble(ops)


def _assemble(ops: list[tuple]) -> list[Insn]:
    labels: dict[str, int] = {}
    pc = 0
    for op in ops:
        if op[0] == "label":
            labels[op[1]] = pc
        else:
            pc += 1
    out: list[Insn] = []
    for op in ops:
        kind = op[0]
        if kind == "label":
            continue
        here = len(out)

        def off(label: str | None, here: int = here) -> int:
            if label is None:
                return 0
            delta = labels[label] - here - 1
            if not 0 <= delta <= 255:
                raise ValueError(f"jump to {label} out of range ({delta})")
            return delta

        if kind == "ld":
            out.append((_LD_W_ABS, 0, 0, op[1]))
        elif kind == "and":
            out.append((_ALU_AND_K, 0, 0, op[1]))
        elif kind == "ret":
            out.append((_RET_K, 0, 0, op[1]))
        elif kind == "tax":
            out.append((_MISC_TAX, 0, 0, 0))
        elif kind == "txa":
            out.append((_MISC_TXA, 0, 0, 0))
        elif kind == "ja":
            out.append((_JMP_JA, 0, 0, off(op[1])))  # k is the offset
        else:
            code = {"jeq": _JMP_JEQ_K, "jge": _JMP_JGE_K, "jset": _JMP_JSET_K}[kind]
            out.append((code, off(op[2]), off(op[3]), op[1]))
    return out


def pack_program(program: list[Insn]) -> bytes:
    """struct sock_filter[]: u16 code, u8 jt, u8 jf, u32 k."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


# ---- the I/O edge: applied in the child between fork and exec -------------------------------------
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class ConfinementError(OSError):
    """The kernel refused a confinement step (QEMU is then not started)."""


class Confinement:
    """Everything the child needs, built in the parent: `preexec` is subprocess's preexec_fn.

    The child is a fork of a threaded process: `preexec` allocates nothing it can avoid and takes
    no lock, it only makes prebuilt ctypes calls with prebuilt arguments. On failure it writes
    which step failed to fd 2 (QEMU's log) and raises, so the exec never happens.
    """

    def __init__(self, kept: Iterable[int] = KEPT_CAPS) -> None:
        self.kept = frozenset(kept)
        sets = cap_sets(self.kept)
        self._drop = sets.drop_bounding
        libc = ctypes.CDLL(None, use_errno=True)
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self._prctl.restype = ctypes.c_int
        self._capset = libc.capset
        self._capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._capset.restype = ctypes.c_int
        self._umask = libc.umask
        self._umask.argtypes = [ctypes.c_uint]
        self._umask.restype = ctypes.c_uint
        self._header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        self._data = (_CapData * 2)(*(_CapData(e, e, i) for e, i in zip(sets.effective, sets.inheritable,
                                                                          strict=True)))
        self._header_p, self._data_p = ctypes.addressof(self._header), ctypes.addressof(self._data)
        code = pack_program(seccomp_program())
        self._filter = ctypes.create_string_buffer(code, len(code))
        self._fprog = _SockFprog(len(code) // 8, ctypes.addressof(self._filter))
        self._fprog_p = ctypes.addressof(self._fprog)
        self._msgs = {step: f"kata-py: cannot confine QEMU: {step} failed\n".encode()
                      for step in ("no_new_privs", "bounding set", "ambient set", "capset", "seccomp")}

    def preexec(self) -> None:
        """Apply the confinement to the calling process (meant for the child before exec)."""
        prctl = self._prctl
        # QEMU creates its own few files with explicit modes in root's 0700 directories; umask 0 lets
        # a 9p mkdirat carry the guest's exact mode where the filter skips the chmod after it.
        self._umask(0)
        if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            self._fail("no_new_privs")
        for cap in self._drop:  # needs CAP_SETPCAP: before capset drops it
            if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
                self._fail("bounding set")  # EINVAL: a capability this kernel does not have
        if prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
            self._fail("ambient set")
        if self._capset(self._header_p, self._data_p) != 0:
            self._fail("capset")
        # last: no_new_privs lets an unprivileged process install it; nothing after it needs more
        if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._fprog_p, 0, 0) != 0:
            self._fail("seccomp")

    def _fail(self, step: str) -> None:
        err = ctypes.get_errno()
        try:
            os.write(2, self._msgs[step])
        except OSError:
            pass
        raise ConfinementError(err, f"cannot confine QEMU: {step}: {os.strerror(err)}")


_default: Confinement | None = None


def default_confinement() -> Confinement:
    """The process-wide Confinement for KEPT_CAPS (built on first use)."""
    global _default
    if _default is None:
        _default = Confinement()
    return _default
