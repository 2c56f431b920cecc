"""The template cache on disk: one directory per key, committed atomically, validated before use.

Layout: `<root>/<key>/` holds `state` (device state, a few hundred KiB: RAM is not in it), `ram`
(the guest RAM file clones map copy-on-write; sparse) and `meta.json` (key, sizes, checksums),
written last. A template is built in `<root>/.build-<key>-<rand>/` and renamed into place, so a
reader sees a whole template or none. Files are never rewritten in place: clones map `ram`, and a
replaced or evicted template is renamed away and unlinked (mappings of unlinked files stay valid).

Validation (`lookup`) checks meta.json, the state file's size and SHA-256 (cheap: it is small) and
the RAM file's size plus a digest of sampled pages; anything off means "no template" and the broken
one is removed, so it is rebuilt rather than half-used.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state"
RAM_FILE = "ram"
META_FILE = "meta.json"
RAM_SAMPLES = 256  # pages hashed in the RAM file: catches truncation/overwrites without reading it all
PAGE = 4096
MIB = 1 << 20


class TemplateInvalid(Exception):
    """A template on disk that must not be used (says why)."""


@dataclass(frozen=True)
class Template:
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def ram(self) -> Path:
        return self.path / RAM_FILE

    def disk_bytes(self) -> int:
        """Allocated bytes (the RAM file is sparse)."""
        return sum(f.stat().st_blocks * 512 for f in self.path.iterdir() if f.is_file())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def ram_digest(path: Path, size: int) -> str:
    """Digest of RAM_SAMPLES pages spread evenly over the file (plus its last page)."""
    h = hashlib.sha256()
    pages = max(1, size // PAGE)
    offsets = sorted({(i * pages // RAM_SAMPLES) * PAGE for i in range(RAM_SAMPLES)} | {(pages - 1) * PAGE})
    with open(path, "rb") as f:
        for off in offsets:
            h.update(os.pread(f.fileno(), PAGE, off))
    return h.hexdigest()


def describe_files(path: Path) -> dict[str, Any]:
    """The checksums meta.json records for a freshly saved template in `path`."""
    ram_size = (path / RAM_FILE).stat().st_size
    return {"state_size": (path / STATE_FILE).stat().st_size, "state_sha256": _sha256_file(path / STATE_FILE),
            "ram_size": ram_size, "ram_digest": ram_digest(path / RAM_FILE, ram_size)}


class TemplateStore:
    """Templates under `root`, at most `max_bytes` of disk in total (0: no cap)."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _ensure_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    # ---- reading -------------------------------------------------------------------------------
    def lookup(self, key: str) -> Template | None:
        """The valid template for `key`, or None; a broken one is removed (and logged)."""
        path = self.root / key
        if not path.exists():
            return None
        try:
            return self.validate(key)
        except TemplateInvalid as exc:
            log.warning("template %s is invalid, removing it: %s", key, exc)
            self.remove(key)
            return None

    def validate(self, key: str) -> Template:
        """Raises TemplateInvalid naming the first problem."""
        path = self.root / key
        try:
            meta = json.loads((path / META_FILE).read_text())
            if meta.get("key") != key:
                raise TemplateInvalid(f"meta.json is for key {meta.get('key')!r}")
            state_size = (path / STATE_FILE).stat().st_size
            ram_size = (path / RAM_FILE).stat().st_size
            if state_size != meta["state_size"] or ram_size != meta["ram_size"]:
                raise TemplateInvalid(f"size mismatch: state {state_size}/{meta['state_size']}, "
                                      f"ram {ram_size}/{meta['ram_size']}")
            if _sha256_file(path / STATE_FILE) != meta["state_sha256"]:
                raise TemplateInvalid("state file checksum mismatch")
            if ram_digest(path / RAM_FILE, ram_size) != meta["ram_digest"]:
                raise TemplateInvalid("RAM file digest mismatch")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TemplateInvalid(f"{type(exc).__name__}: {exc}") from exc
        return Template(key, path, meta)

    def list(self) -> list[Template]:
        """Committed templates (unvalidated: meta.json only), oldest first."""
        found = []
        for path in self.root.glob("*/" + META_FILE) if self.root.is_dir() else ():
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError):
                meta = {}
            found.append(Template(path.parent.name, path.parent, meta))
        return sorted(found, key=lambda t: t.meta.get("created", 0))

    # ---- writing -------------------------------------------------------------------------------
    def staging_dir(self, key: str) -> Path:
        """A fresh private directory to build the template for `key` in."""
        self._ensure_root()
        path = self.root / f".build-{key}-{uuid.uuid4().hex[:8]}"
        path.mkdir(mode=0o700)
        return path

    def commit(self, key: str, staging: Path, extra: dict[str, Any]) -> Template:
        """Record checksums, fsync, and rename `staging` to the key's directory (replacing any old
        one). Raises OSError."""
        meta = {"key": key, "created": time.time(), **extra, **describe_files(staging)}
        for name in (STATE_FILE, RAM_FILE):
            (staging / name).chmod(0o400)
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        tmp = staging / (META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(staging / META_FILE)
        self.remove(key)
        staging.rename(self.root / key)
        _fsync_dir(self.root)
        self.evict(keep=key)
        return Template(key, self.root / key, meta)

    def remove(self, key: str) -> None:
        """Remove one template (clones that map its RAM file keep working). Idempotent."""
        path = self.root / key
        if path.exists():
            trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            try:
                path.rename(trash)
            except OSError:
                return
            shutil.rmtree(trash, ignore_errors=True)

    def clear(self) -> int:
        """Remove every template and leftover build directory; returns how many templates went."""
        n = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.iterdir():
            if path.is_dir():
                if not path.name.startswith("."):
                    n += 1
                    self.remove(path.name)
                else:
                    shutil.rmtree(path, ignore_errors=True)
        return n

    def evict(self, keep: str = "") -> builtins.list[str]:  # `list` in this class is the method
        """Remove the oldest templates until all fit in max_bytes (never `keep`); returns the keys."""
        if not self.max_bytes:
            return []
        templates = self.list()
        total = sum(t.disk_bytes() for t in templates)
        gone = []
        for t in templates:
            if total <= self.max_bytes:
                break
            if t.key == keep:
                continue
            total -= t.disk_bytes()
            self.remove(t.key)
            gone.append(t.key)
        if gone:
            log.info("template cache over %d MiB: evicted %s", self.max_bytes // MIB, ", ".join(gone))
        return gone

    def remove_stale_builds(self, older_than_s: float = 600) -> None:
        """Build directories left by a builder that died (a live one holds the key's lock)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob(".build-*"):
            try:
                if time.time() - path.stat().st_mtime > older_than_s:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass

    @contextmanager
    def try_lock(self, key: str) -> Iterator[bool]:
        """Non-blocking exclusive lock on building `key`: yields False if someone else holds it."""
        self._ensure_root()
        fd = os.open(self.root / f".lock-{key}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
