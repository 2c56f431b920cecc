"""Every id that names a host path (container, exec, grouping, sandbox) passes containerd's own
identifier rule whole; anything else is InvalidArgument before it touches the filesystem."""

from __future__ import annotations

import pytest

from shim import oci
from shim.errors import InvalidArgument
from shim.layout import sandbox_state_dir

BAD = ["../x", "a/b", "x\n", "..", ".", "", "-x", "x-", "a..b", "a b", "é", "x\x00", "a" * 77, "/abs"]
GOOD = ["c1", "web-1", "a.b_c-d", "0" * 64, "a" * 76]


@pytest.mark.parametrize("value", BAD)
def test_bad_ids_are_refused(value: str):
    with pytest.raises(InvalidArgument):
        oci.validate_id(value, "container id")


@pytest.mark.parametrize("value", GOOD)
def test_good_ids_pass(value: str):
    assert oci.validate_id(value) == value


@pytest.mark.parametrize("key", [oci.GROUP_KEY, *oci.SANDBOX_ID_KEYS])
@pytest.mark.parametrize("value", ["../../..", "a/b", "x\n"])
def test_grouping_and_sandbox_ids_from_annotations_are_checked(key: str, value: str):
    with pytest.raises(InvalidArgument):
        oci.grouping_id("c1", {key: value})


def test_grouping_falls_back_to_a_checked_container_id():
    assert oci.grouping_id("c1", {}) == "c1"
    with pytest.raises(InvalidArgument):
        oci.grouping_id("../c1", {})


def test_state_dirs_stay_below_their_root():
    for value in GOOD:
        path = sandbox_state_dir("/run/kata-py", value)
        assert path.parent.as_posix() == "/run/kata-py/sandboxes" and len(path.name) <= 24
