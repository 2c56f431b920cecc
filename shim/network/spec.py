"""Where a pod's network namespace is named (pure: no netlink, cheap to import)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def netns_path(spec: Mapping[str, Any]) -> str | None:
    """The network namespace path of an OCI spec, or None (no pod network: the VM gets no NIC)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return None
