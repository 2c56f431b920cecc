"""mountinfo is parsed as the kernel writes it: only space, tab, newline and backslash are escaped
(as three octal digits); every other byte, UTF-8 or not, is written raw."""

from __future__ import annotations

import os

import pytest

from shim.mounts import mount_points, unescape_mountinfo


@pytest.mark.parametrize(("field", "path"), [
    (b"/srv/vol-\xc3\xa9", "/srv/vol-é"),  # raw UTF-8: unicode_escape used to turn it into mojibake
    (b"/srv/with\\040space", "/srv/with space"),
    (b"/srv/new\\012line", "/srv/new\nline"),
    (b"/srv/tab\\011x", "/srv/tab\tx"),
    (b"/srv/back\\134slash", "/srv/back\\slash"),
    (b"/srv/\\134040", "/srv/\\040"),  # an escaped backslash followed by digits is not an escape
    (b"/srv/raw\\9", "/srv/raw\\9"),  # not three octal digits: left as it is
    (b"/srv/\xff\xfe", os.fsdecode(b"/srv/\xff\xfe")),  # not UTF-8: round-trips through fsdecode
])
def test_unescape(field: bytes, path: str):
    assert unescape_mountinfo(field) == path
    assert os.fsencode(unescape_mountinfo(field)) == os.fsencode(path)


def test_mount_points_from_a_mountinfo_text():
    text = (b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
            b"90 27 0:50 / /srv/vol-\xc3\xa9\\040x rw,relatime shared:1 - tmpfs tmpfs rw\n")
    assert mount_points(text) == ["/", "/srv/vol-é x"]
