"""Validation of what the host names: ids and paths. Pure functions, no I/O beyond symlink resolution."""

import os
import re

from agent.errors import InvalidArgument

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_id(value: str, field: str) -> str:
    """Return `value` if it is a valid container or exec id.

    Raises InvalidArgument naming `field` otherwise (ids become path components and runtime arguments,
    so anything that could escape a directory or look like an option is refused).
    """
    if not _ID_RE.fullmatch(value):
        raise InvalidArgument(f"{field}: invalid id {value!r} (must match {_ID_RE.pattern})")
    return value


def resolve_inside(root: str, path: str, field: str) -> str:
    """Resolve `path` (absolute, symlinks followed where they exist) and check it stays under `root`.

    Returns the resolved path. Raises InvalidArgument naming `field` when `path` is empty, relative
    or resolves outside `root` (e.g. through `..` or a symlink planted in the shared directory).
    """
    if not path or not os.path.isabs(path):
        raise InvalidArgument(f"{field}: path {path!r} must be absolute")
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(path)
    # Strictly inside: mounting over the root itself would hide the agent's own state.
    if not resolved.startswith(real_root + os.sep):
        raise InvalidArgument(f"{field}: path {path!r} is outside the agent root {root}")
    return resolved
