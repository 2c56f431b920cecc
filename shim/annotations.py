"""Kata-style `io.katacontainers.*` annotations on a sandbox spec: allowlisted, validated, applied.

Default deny. An annotation under `io.katacontainers.` is honoured only when its key with that prefix
removed (e.g. `config.hypervisor.default_vcpus`) fully matches one of the regexes in the configuration's
`[runtime] enable_annotations`; any other `io.katacontainers.*` annotation is refused, as is an enabled
one we do not support. Annotations outside the prefix are not ours and are ignored.

Supported (all under `io.katacontainers.config.hypervisor.`):

| key | value | effect |
|---|---|---|
| `default_vcpus` | integer, 1..max_vcpus | boot vCPUs |
| `default_memory` | integer MiB, 128..max_memory_mib | boot memory |
| `kernel_params` | space-separated `key[=value]` | appended to the guest kernel command line |
| `kernel` / `initrd` / `image` | absolute path | the VM's kernel / initrd / root image |
| `kernel_hash` / `initrd_hash` / `image_hash` | sha512 hex digest | required with the path |
| `asset_hash_type` | `sha512` | the only algorithm accepted |

An asset path must be absolute, resolve (symlinks followed) to a regular file under one of
`[hypervisor] valid_asset_dirs` (empty: no asset annotation can pass), and its content must have the
given sha512 digest. Every violation raises InvalidArgument naming the annotation and the rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .errors import InvalidArgument

PREFIX = "io.katacontainers."
HYPERVISOR = "config.hypervisor."
ASSETS = ("kernel", "initrd", "image")
HASH_TYPES = ("sha512",)
# kernel parameters an annotation may not set: they would take the guest's boot or agent away from us
RESERVED_KERNEL_PARAMS = re.compile(r"(init|rdinit|root|rootfstype|rootflags|kata_py\..*|panic|console)")
_KERNEL_PARAM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(=[A-Za-z0-9_.,:/@+\-]*)?")
_SHA512 = re.compile(r"[0-9a-f]{128}")


@dataclass(frozen=True)
class GuestAssets:
    """Per-sandbox replacements for the guest image's files (None: the image's own)."""

    kernel: Path | None = None
    initrd: Path | None = None
    image: Path | None = None


@dataclass(frozen=True)
class Effective:
    config: Config
    assets: GuestAssets


def _enabled(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether `key` (prefix removed) fully matches an allowlist regex. Raises InvalidArgument on a bad regex."""
    for pattern in patterns:
        try:
            if re.fullmatch(pattern, key):
                return True
        except re.error as exc:
            raise InvalidArgument(f"config [runtime] enable_annotations: bad regex {pattern!r}: {exc}") from None
    return False


def _int(name: str, value: str, low: int, high: int) -> int:
    """Raises InvalidArgument unless value is a decimal integer in [low, high]."""
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise InvalidArgument(f"annotation {name}: {value!r} is not a non-negative integer")
    number = int(value)
    if not low <= number <= high:
        raise InvalidArgument(f"annotation {name}: {number} is outside {low}..{high}")
    return number


def _kernel_params(name: str, value: str) -> tuple[str, ...]:
    """Raises InvalidArgument for a malformed or reserved parameter."""
    params = tuple(value.split())
    for param in params:
        if not _KERNEL_PARAM.fullmatch(param):
            raise InvalidArgument(f"annotation {name}: malformed kernel parameter {param!r}")
        if RESERVED_KERNEL_PARAMS.fullmatch(param.split("=", 1)[0]):
            raise InvalidArgument(f"annotation {name}: kernel parameter {param.split('=', 1)[0]!r} is reserved")
    return params


def sha512_file(path: Path) -> str:
    """Hex sha512 of a file's content. Raises OSError."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_asset(name: str, value: str, digest: str | None, valid_dirs: tuple[str, ...]) -> Path:
    """The resolved path of a permitted asset. Raises InvalidArgument naming the rule it breaks."""
    path = Path(value)
    if not path.is_absolute():
        raise InvalidArgument(f"annotation {name}: asset path {value!r} is not absolute")
    if not valid_dirs:
        raise InvalidArgument(f"annotation {name}: no asset directories are configured "
                              "([hypervisor] valid_asset_dirs is empty)")
    real = path.resolve()
    roots = [Path(d).resolve() for d in valid_dirs]
    if not any(real.is_relative_to(root) for root in roots):
        raise InvalidArgument(f"annotation {name}: asset path {value!r} is not under a valid asset directory "
                              f"({', '.join(valid_dirs)})")
    if not real.is_file():
        raise InvalidArgument(f"annotation {name}: asset {value!r} is not a regular file")
    if digest is None:
        raise InvalidArgument(f"annotation {name}: asset {value!r} needs its sha512 in {name}_hash")
    digest = digest.strip().lower()
    if not _SHA512.fullmatch(digest):
        raise InvalidArgument(f"annotation {name}_hash: {digest!r} is not a sha512 hex digest")
    try:
        actual = sha512_file(real)
    except OSError as exc:
        raise InvalidArgument(f"annotation {name}: cannot read asset {value!r}: {exc.strerror}") from None
    if actual != digest:
        raise InvalidArgument(f"annotation {name}: asset {value!r} does not match {name}_hash "
                              f"(sha512 is {actual[:16]}…, expected {digest[:16]}…)")
    return real


def ours(annotations: Mapping[str, str]) -> dict[str, str]:
    """The `io.katacontainers.*` annotations, prefix removed."""
    return {k[len(PREFIX):]: v for k, v in annotations.items() if k.startswith(PREFIX)}


def check_enabled(annotations: Mapping[str, str], patterns: tuple[str, ...]) -> dict[str, str]:
    """Our annotations (prefix removed), all enabled. Raises InvalidArgument for the first that is not."""
    found = ours(annotations)
    for key in sorted(found):
        if not _enabled(key, patterns):
            raise InvalidArgument(f"annotation {PREFIX}{key} is not enabled: it must match "
                                  "[runtime] enable_annotations in the kata-py configuration")
    return found


def apply_annotations(config: Config, annotations: Mapping[str, str]) -> Effective:
    """The sandbox's effective configuration. Raises InvalidArgument for anything refused."""
    found = check_enabled(annotations, config.runtime.enable_annotations)
    unsupported = sorted(k for k in found if not k.startswith(HYPERVISOR))
    if unsupported:
        raise InvalidArgument(f"annotation {PREFIX}{unsupported[0]} is not supported by kata-py")
    hyp = {k[len(HYPERVISOR):]: v for k, v in found.items()}
    h = config.hypervisor
    changes: dict[str, object] = {}
    assets: dict[str, Path] = {}
    for short, value in sorted(hyp.items()):
        name = PREFIX + HYPERVISOR + short
        if short == "default_vcpus":
            changes["default_vcpus"] = _int(name, value, 1, h.max_vcpus)
        elif short == "default_memory":
            changes["default_memory_mib"] = _int(name, value, 128, h.max_memory_mib)
        elif short == "kernel_params":
            params = _kernel_params(name, value)
            changes["kernel_params"] = " ".join(filter(None, (h.kernel_params, *params)))
        elif short in ASSETS:
            assets[short] = check_asset(name, value, hyp.get(f"{short}_hash"), h.valid_asset_dirs)
        elif short.endswith("_hash") and short.removesuffix("_hash") in ASSETS:
            if short.removesuffix("_hash") not in hyp:
                raise InvalidArgument(f"annotation {name} given without {name.removesuffix('_hash')}")
        elif short == "asset_hash_type":
            if value.strip().lower() not in HASH_TYPES:
                raise InvalidArgument(f"annotation {name}: {value!r} is not supported (only sha512)")
        else:
            raise InvalidArgument(f"annotation {name} is not supported by kata-py")
    effective = dataclasses.replace(config, hypervisor=dataclasses.replace(h, **changes))  # type: ignore[arg-type]
    return Effective(effective, GuestAssets(**assets))
