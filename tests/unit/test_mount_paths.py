"""The pure rule for where a volume may be mounted in a VM, and the staging names derived from it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.orchestrator.drivers.mount_paths import RESERVED, check_mount_path, components, mount_key

ALLOWED = [
    "/data",
    "/home/user/project",
    "/mnt/a b",
    "/workspace/x.y-z_1",
    "/var/lib/db",
    "/root/v",
    "/tmp/x",
]
REFUSED = [
    "",
    "/",
    "data",
    "./data",
    "/data/",
    "//data",
    "/data//x",
    "/data/./x",
    "/data/../etc",
    "/..",
    "/proc",
    "/proc/sys",
    "/sys/x",
    "/dev",
    "/dev/shm/x",
    "/etc",
    "/etc/cron.d",
    "/usr/local/bin",
    "/run/x",
    "/.sandbox-volumes",
    "/.sandbox-volumes/abc",
    "/data\x00x",
    "/data\nx",
    "/" + "x" * 256,
    "/x" * 600,
]


@pytest.mark.parametrize("path", ALLOWED)
def test_allowed(path: str) -> None:
    assert check_mount_path(path) == path
    assert "/" + "/".join(components(path)) == path


@pytest.mark.parametrize("path", REFUSED)
def test_refused(path: str) -> None:
    with pytest.raises(ValueError):
        check_mount_path(path)


def test_a_reserved_name_is_refused_only_as_a_folder_not_as_a_prefix() -> None:
    assert check_mount_path("/procedures") == "/procedures"
    assert check_mount_path("/devices/x") == "/devices/x"
    assert all(r.startswith("/") for r in RESERVED)


def test_keys_are_per_path_and_stable() -> None:
    assert mount_key("/data") == mount_key("/data") != mount_key("/data2")
    assert len(mount_key("/data")) == 16 and mount_key("/data").isalnum()


@given(st.text(max_size=40))
def test_anything_accepted_is_absolute_normal_and_outside_system_folders(path: str) -> None:
    try:
        checked = check_mount_path(path)
    except ValueError:
        return
    names = checked[1:].split("/")
    assert checked.startswith("/") and all(n not in ("", ".", "..") for n in names)
    assert not any(checked == r or checked.startswith(r + "/") for r in RESERVED)
