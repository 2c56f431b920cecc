"""containerd releases for the tests, without touching the host's apt.

1.6.20 is bookworm's containerd, installed on the host. 1.7.24 (trixie) and 2.1.9 (sid) come from
Debian's archive as they are: their binaries need only libc6 >= 2.34 (bookworm has 2.36), and the
same package carries `ctr`. They are fetched with a private sources list and private apt state
(lists, cache) — /etc/apt and /var/lib/apt are never written — then `dpkg-deb -x`'d into
/var/cache/kata-py/containerd/<debian version>/, so a machine pays the ~60 MB download once.

    python -m tests.support.containerd_releases            # fetch every release, print where
    python -m tests.support.containerd_releases api        # also containerd's API protos (2.1.9)

Versions are pinned exactly: when the archive no longer serves a pinned version (sid moves), the
fetch fails naming what the archive has now, so the pin is updated on purpose.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("KATA_PY_CONTAINERD_CACHE", "/var/cache/kata-py/containerd"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = ("trixie", "sid")
API_PACKAGE = ("golang-github-containerd-containerd-api-dev", "2.1.9+ds1-5", "sid")


@dataclass(frozen=True)
class Release:
    """One containerd release line the tests prove: `name` is what test ids show ("1.7")."""

    name: str
    version: str  # Debian's version of the containerd package
    suite: str  # "" = the host's own package (bookworm)

    @property
    def major(self) -> int:
        return int(self.name.split(".")[0])

    @property
    def upstream(self) -> str:
        """The upstream version, e.g. 1.7.24 for 1.7.24~ds1-6+deb13u1."""
        return re.split(r"[~+-]", self.version, maxsplit=1)[0]


HOST = Release("1.6", "1.6.20~ds1-1+deb12u3", "")
RELEASES = {r.name: r for r in (HOST, Release("1.7", "1.7.24~ds1-6+deb13u1", "trixie"),
                                Release("2.1", "2.1.9+ds1-5", "sid"))}


class ReleaseUnavailable(RuntimeError):
    """A release could not be provided (no such version in the archive, apt or dpkg-deb failed)."""


def bin_dir(release: Release) -> Path:
    """The directory holding this release's `containerd`, `ctr` and runc shim, fetched if needed.

    Raises ReleaseUnavailable with the reason."""
    if not release.suite:
        found = shutil.which("containerd")
        if found is None:
            raise ReleaseUnavailable("containerd is not installed (apt-get install containerd)")
        out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
        if release.upstream not in out:
            raise ReleaseUnavailable(f"the host's containerd is not {release.upstream}: {out.strip()}")
        return Path(found).parent
    return extracted("containerd", release.version, release.suite, CACHE_ROOT / release.version) / "usr" / "bin"


def api_proto_root() -> Path:
    """containerd's API sources of 2.1.9 (…/github.com/containerd/containerd/api), fetched if needed."""
    name, version, suite = API_PACKAGE
    root = extracted(name, version, suite, CACHE_ROOT / f"api-{version}")
    return root / "usr/share/gocode/src/github.com/containerd/containerd/api"


def extracted(package: str, version: str, suite: str, target: Path) -> Path:
    """`target` holding package=version unpacked; downloads and unpacks it on the first call.
    Concurrent callers (two pytest runs) wait for each other on a lock file."""
    done = target / ".complete"
    if done.exists():
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_ROOT / ".lock"):
        if done.exists():
            return target
        apt = PrivateApt(CACHE_ROOT / "apt")
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=CACHE_ROOT) as tmp:
            deb = apt.download(package, version, suite, Path(tmp))
            unpacked = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
            (unpacked / ".complete").write_text(f"{package}={version} from {suite}\n")
            shutil.rmtree(target, ignore_errors=True)  # a half-made one from a killed run
            unpacked.rename(target)
    return target


class PrivateApt:
    """apt-get with its own sources list, lists and cache under `root`; the host's apt stays as it is."""

    def __init__(self, root: Path, mirror: str | None = None) -> None:
        self.root = root
        self.mirror = mirror or host_mirror()
        self._updated = False

    def options(self) -> list[str]:
        return ["-o", f"Dir::Etc::SourceList={self.root / 'sources.list'}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={self.root / 'lists'}",
                "-o", f"Dir::Cache={self.root / 'cache'}",
                "-o", "APT::Sandbox::User=root"]  # _apt cannot write into our root-owned temp dirs

    def update(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list").write_text("".join(
            f"deb [signed-by={KEYRING}] {self.mirror} {suite} main\n" for suite in SUITES))
        _run(["apt-get", *self.options(), "-q", "update"], "apt-get update (private lists)")
        self._updated = True

    def versions(self, package: str) -> list[str]:
        """The versions of `package` the private lists offer."""
        out = _run(["apt-cache", *self.options(), "madison", package], f"apt-cache madison {package}")
        return [line.split("|")[1].strip() for line in out.splitlines() if line.count("|") >= 2]

    def download(self, package: str, version: str, suite: str, into: Path) -> Path:
        if not self._updated:
            self.update()
        if version not in self.versions(package):
            raise ReleaseUnavailable(f"{package}={version} is no longer in Debian {suite}; the archive has "
                                     f"{', '.join(self.versions(package)) or 'none'}: update the pin in "
                                     f"{__name__}")
        _run(["apt-get", *self.options(), "-q", "download", f"{package}={version}"],
             f"apt-get download {package}={version}", cwd=into)
        debs = list(into.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise ReleaseUnavailable(f"apt-get download {package}={version} left {debs}")
        return debs[0]


def host_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian archive URL this machine's apt uses (the entry serving its own release, not
    -security), so that the private lists come from the same mirror; deb.debian.org otherwise."""
    entries: list[tuple[str, list[str]]] = []
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    entries += [(uri, fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split()]
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    entries.append((m.group(1), [m.group(2)]))
    for uri, suites in entries:
        if any(re.fullmatch(r"[a-z]+(-updates)?", s) for s in suites) and "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReleaseUnavailable(f"{what}: {exc}") from exc
    if done.returncode != 0:
        raise ReleaseUnavailable(f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str]) -> int:
    try:
        for release in RELEASES.values():
            print(f"containerd {release.name} ({release.version}): {bin_dir(release)}")
        if "api" in argv:
            print(f"containerd API protos {API_PACKAGE[1]}: {api_proto_root()}")
    except ReleaseUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
