"""A VM cannot share the host's network or IPC: CRI sandboxes asking for them are refused, naming the field."""

from __future__ import annotations

import pytest

from shim.errors import InvalidArgument
from shim.oci import refuse_host_namespaces

POD_NS = [{"type": t} for t in ("pid", "ipc", "uts", "mount")] + [{"type": "network", "path": "/var/run/netns/cni-1"}]


def sandbox(namespaces: list[dict[str, str]], kind: str = "sandbox") -> dict:
    return {"annotations": {"io.kubernetes.cri.container-type": kind}, "linux": {"namespaces": namespaces}}


def test_a_pod_with_its_own_namespaces_passes():
    refuse_host_namespaces(sandbox(POD_NS))


@pytest.mark.parametrize("missing, field", [("network", "hostNetwork: true"), ("ipc", "hostIPC: true")])
def test_a_host_namespace_is_refused_naming_the_field(missing: str, field: str):
    with pytest.raises(InvalidArgument) as info:
        refuse_host_namespaces(sandbox([ns for ns in POD_NS if ns["type"] != missing]))
    assert field in str(info.value) and repr(missing) in str(info.value)
    assert "runc RuntimeClass" in str(info.value)


def test_both_are_named():
    with pytest.raises(InvalidArgument) as info:
        refuse_host_namespaces(sandbox([{"type": "pid"}, {"type": "mount"}]))
    assert "hostNetwork: true and hostIPC: true" in str(info.value)


def test_cri_o_spelling_and_plain_containers():
    with pytest.raises(InvalidArgument):
        refuse_host_namespaces({"annotations": {"io.kubernetes.cri-o.ContainerType": "sandbox"}, "linux": {}})
    # a pod's app container and a plain ctr container (`ctr run --net-host`) are not pods asking for the host
    refuse_host_namespaces(sandbox([], kind="container"))
    refuse_host_namespaces({"linux": {"namespaces": []}})
