"""net.* sysctls (containerd 2.x sets net.ipv4.ip_unprivileged_port_start on every pod) belong to the
pod's network, the VM's own in the guest: out of the runtime's spec, set by the agent itself."""

from __future__ import annotations

import pytest

from agent.containers import set_sysctl
from agent.errors import InvalidArgument
from agent.spec import guest_spec, pod_network_sysctls

SPEC = {"process": {"args": ["true"]}, "linux": {"sysctl": {"net.ipv4.ip_unprivileged_port_start": "0",
                                                           "kernel.msgmax": "8192"}}}


def test_net_sysctls_leave_the_runtime_spec_and_go_to_the_agent():
    out = guest_spec(SPEC, "c1", "/r", False)
    assert out["linux"]["sysctl"] == {"kernel.msgmax": "8192"}
    assert pod_network_sysctls(SPEC) == {"net.ipv4.ip_unprivileged_port_start": "0"}


@pytest.mark.parametrize("key", ["net.../../etc/x", "net./a", "net.ipv4.x/y"])
def test_keys_that_are_not_sysctl_names_are_refused(key: str):
    with pytest.raises(InvalidArgument):
        pod_network_sysctls({"linux": {"sysctl": {key: "1"}}})


def test_set_sysctl_writes_below_proc_sys(tmp_path):
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_unprivileged_port_start").write_text("1024")
    set_sysctl("net.ipv4.ip_unprivileged_port_start", "0", str(tmp_path))
    assert (tmp_path / "net" / "ipv4" / "ip_unprivileged_port_start").read_text() == "0"
    with pytest.raises(InvalidArgument):
        set_sysctl("net.ipv4.nope", "1", str(tmp_path))
