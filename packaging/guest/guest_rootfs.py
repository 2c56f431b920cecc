"""Base stage, userland half: a slim Debian root with python3, runc, crun and PyPI's grpcio/protobuf."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from guest_common import log, run

SUITE = "bookworm"
# Debian's python3-grpcio/python3-protobuf are too old for protos/ (needs grpcio>=1.85.1,
# protobuf>=7.35): those come from PyPI below. libpython3.11-stdlib: python3-minimal lacks asyncio etc.
# kmod: /sbin/modprobe, which the kernel runs to load a module on demand (guest_kernel.ON_DEMAND_MODULES).
INCLUDE = ("python3-minimal", "libpython3.11-stdlib", "runc", "crun", "iproute2", "kmod")
# typing_extensions: grpcio's one runtime dependency (pip runs with --no-deps to pin all three).
PIP_PACKAGES = ("grpcio", "protobuf", "typing_extensions")
SITE_DIR = "usr/lib/python3/dist-packages"
GUEST_PYTHON_VERSION = "3.11"  # bookworm's python3

# Nothing reads these in an immutable, non-interactive guest.
_SLIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/zoneinfo",
    "usr/share/common-licenses",
    "usr/share/lintian",
    "usr/share/bash-completion",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf",
    "var/log",
)


def pip_versions() -> dict[str, str]:
    """The host's versions: guest and host must speak the same generated protobuf code."""
    return {name: importlib.metadata.version(name) for name in PIP_PACKAGES}


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror apt is configured with (the only host we may fetch from)."""
    roots = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in roots:
        if not src.is_file():
            continue
        text = src.read_text()
        if src.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
                    return fields["URIs"].split()[0]
        elif src.suffix == ".list" or src.name == "sources.list":
            for line in text.splitlines():
                m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and m.group(2) == suite:
                    return m.group(1)
    raise RuntimeError(f"no apt source for suite {suite}")


def guest_python(rootfs: Path, *args: str) -> str:
    return run(["chroot", rootfs, "/usr/bin/python3", *args], capture=True)


def package_versions(rootfs: Path) -> dict[str, str]:
    out = run(
        [
            "chroot",
            rootfs,
            "dpkg-query",
            "-W",
            "-f",
            "${Package} ${Version}\n",
            *INCLUDE,
            "python3.11-minimal",
        ],
        capture=True,
    )
    return dict(line.split(" ", 1) for line in out.splitlines())


def build(dest: Path, mirror: str, pip: dict[str, str]) -> dict[str, str]:
    """Build the rootfs tree at dest; return package versions (Debian's and PyPI's)."""
    log(f"debootstrap {SUITE} from {mirror} (log: {dest.parent}/debootstrap.log)")
    with open(dest.parent / "debootstrap.log", "w") as logf:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(dest), mirror],
            stdout=logf,
            stderr=subprocess.STDOUT,
            check=True,
        )
    site = dest / SITE_DIR
    log(f"pip wheels into the guest: {pip}")
    run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--no-deps",
            "--target", site, "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
            "--python-version", GUEST_PYTHON_VERSION, "--implementation", "cp",
            *(f"{n}=={v}" for n, v in pip.items()),
        ]
    )  # fmt: skip
    for rel in _SLIM:
        shutil.rmtree(dest / rel, ignore_errors=True)
        (dest / rel).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # pip's entry-point scripts
    # Byte-compile with the guest's own python, hash-based and unchecked: the erofs image gets fixed
    # mtimes (reproducible), which would invalidate Debian's mtime-based .pyc and make every boot
    # recompile into the tmpfs overlay.
    log("compileall (guest python, unchecked-hash)")
    guest_python(
        dest, "-m", "compileall", "-q", "-f", "-j0", "--invalidation-mode", "unchecked-hash",
        f"/usr/lib/python{GUEST_PYTHON_VERSION}", f"/{SITE_DIR}",
    )  # fmt: skip
    got = guest_python(
        dest, "-c", "import grpc, google.protobuf as p; print(grpc.__version__, p.__version__)"
    ).split()
    if got != [pip["grpcio"], pip["protobuf"]]:
        raise RuntimeError(f"guest python imports grpc/protobuf {got}, wanted {pip}")
    versions = package_versions(dest)
    versions.update({f"pypi:{n}": v for n, v in pip.items()})
    return versions
