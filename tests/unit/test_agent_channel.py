"""Which agent channel a VM gets (#19 "templates on every host"): virtio-serial wherever templates or
the pool are on, so a KVM host with vhost-vsock still restores from templates; vsock by config."""

from __future__ import annotations

import pytest

from shim.config import parse_config
from shim.errors import FailedPrecondition, InvalidArgument
from shim.vm_shape import agent_over_vsock


@pytest.mark.parametrize("text, host_has_vsock, expected", [
    ("", True, False),  # the default: templates on, so serial even where vsock exists
    ("", False, False),
    ("[factory]\ntemplate = false\n", True, True),  # nothing to template: vsock where the host has it
    ("[factory]\ntemplate = false\n", False, False),
    ('[factory]\ntemplate = false\npool_socket = "/run/kata-py/pool/pool.sock"\n', True, False),
    ('[agent]\nchannel = "vsock"\n', True, True),  # asked for: vsock, templates or not
    ('[agent]\nchannel = "serial"\n[factory]\ntemplate = false\n', True, False),
])
def test_channel_choice(text: str, host_has_vsock: bool, expected: bool):
    assert agent_over_vsock(parse_config(text), host_has_vsock) is expected


def test_vsock_asked_for_on_a_host_without_it_is_a_clear_error():
    with pytest.raises(FailedPrecondition, match="no /dev/vhost-vsock"):
        agent_over_vsock(parse_config('[agent]\nchannel = "vsock"\n'), False)


def test_an_unknown_channel_is_refused_naming_the_key():
    with pytest.raises(InvalidArgument, match=r"\[agent\] channel"):
        parse_config('[agent]\nchannel = "tcp"\n')
