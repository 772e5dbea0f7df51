"""Pure helpers of a VM's root file system: mountinfo parsing and the init-command check."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.orchestrator.drivers.rootfs import has_command, parse_mount_points

MOUNTINFO = (
    b"22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"48 27 7:0 / /run/gateway-vms/gw/vm\\040one/disk rw - ext4 /dev/loop0 rw\n"
    b"49 27 0:4 user:[4026532174] /run/gateway-vms/gw/vm-2/userns rw - nsfs nsfs rw\n"
    b"50 27 0:5 / /odd\\011tab\\134back rw - tmpfs tmpfs rw\n"
    b"truncated\n"
)


def test_mount_points_are_read_with_their_escapes_undone() -> None:
    assert parse_mount_points(MOUNTINFO) == {
        "/",
        "/run/gateway-vms/gw/vm one/disk",
        "/run/gateway-vms/gw/vm-2/userns",
        "/odd\ttab\\back",
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/python3.11").write_text("")
    # An absolute link, as Debian's alternatives are: it points into the VM's root, never followed here.
    (tmp_path / "usr/bin/python3").symlink_to("/usr/bin/python3.11")
    (tmp_path / "usr/bin/editor").symlink_to("/etc/alternatives/editor")
    return tmp_path


@pytest.mark.parametrize(
    ("command", "found"),
    [
        ("python3", True),
        ("/usr/bin/python3", True),
        ("editor", True),  # a dangling link still names a program the VM may have
        ("sleep", False),
        ("/nonexistent/init", False),
    ],
)
def test_the_init_command_is_looked_up_in_the_vms_root(root: Path, command: str, found: bool) -> None:
    assert has_command(root, command, "/usr/local/bin:/usr/bin:/bin") is found
