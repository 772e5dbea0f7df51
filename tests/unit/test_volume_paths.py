"""Pure parts of volumes (issue 21): the path grammar, holder names, what the store reads from the host
(mountinfo, losetup), its state file, and the records."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.state.records import VolumeCheckpointRecord, VolumeRecord
from gateway.volumes.local import VolumeState, decode_mount_field, loop_devices, mount_points
from gateway.volumes.paths import PathProblem, components, holder_slug, is_safe_id, prefix_start


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("a.txt", ("a.txt",)),
        ("/a/b", ("a", "b")),
        ("a//b/./c/", ("a", "b", "c")),
        ("/etc/passwd", ("etc", "passwd")),  # the volume's own /etc: nothing outside
        ("...", ("...",)),
        ("a/..b", ("a", "..b")),
        ("with space/é", ("with space", "é")),
    ],
)
def test_paths_are_components_under_the_volume_root(path: str, parts: tuple[str, ...]) -> None:
    assert components(path) == parts


@pytest.mark.parametrize(
    "path", ["..", "../x", "a/../b", "a/..", "/..", "", "/", ".", "a\0b", "x" * 5000, "a/" + "b" * 256]
)
def test_paths_that_climb_or_name_nothing_are_refused(path: str) -> None:
    with pytest.raises(PathProblem):
        components(path)


def test_the_root_is_allowed_only_where_asked() -> None:
    assert components("/", allow_root=True) == ()
    with pytest.raises(PathProblem):
        components("..", allow_root=True)


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "c d"]), max_size=8))
def test_no_accepted_path_holds_a_climbing_component(parts: list[str]) -> None:
    try:
        found = components("/".join(parts))
    except PathProblem:
        return
    assert ".." not in found and "." not in found and "" not in found


@pytest.mark.parametrize(
    ("prefix", "start"),
    [
        ("", ((), "")),
        ("logs/app", (("logs",), "app")),
        ("logs/", (("logs",), "")),
        ("a/b/c", (("a", "b"), "c")),
    ],
)
def test_a_listing_starts_under_the_prefix_directory(prefix: str, start: tuple[tuple[str, ...], str]) -> None:
    assert prefix_start(prefix) == start


@pytest.mark.parametrize("prefix", ["../", "..", "a/../b", "a/.."])
def test_a_prefix_cannot_climb(prefix: str) -> None:
    with pytest.raises(PathProblem):
        prefix_start(prefix)


def test_ids_and_holders_become_safe_file_names() -> None:
    assert is_safe_id("vol-0123abcd") and is_safe_id("c1")
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "a b", "-x"):
        assert not is_safe_id(bad), bad
    slug = holder_slug("vm-1:/mnt/data")
    assert slug == holder_slug("vm-1:/mnt/data") and slug != holder_slug("vm-2")
    assert is_safe_id(slug) and len(slug) == 24


def test_mountinfo_points_are_decoded() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw\n"
        "37 35 7:3 / /data/volumes/pool rw,relatime - xfs /dev/loop3 rw\n"
    )
    assert mount_points(text) == ["/mnt/parent dir", "/data/volumes/pool"]
    assert decode_mount_field("a\\134b\\011c") == "a\\b\tc"
    assert decode_mount_field("trailing\\04") == "trailing\\04"


def test_loop_devices_are_read_from_losetup_json() -> None:
    text = (
        '{"loopdevices": [{"name": "/dev/loop0", "back-file": "/d/volumes/pool.img"},'
        ' {"name": "/dev/loop1", "back-file": "/d/volumes/pool/images/v.img (deleted)"},'
        ' {"name": "/dev/loop2", "back-file": null}]}'
    )
    assert loop_devices(text) == {
        "/dev/loop0": "/d/volumes/pool.img",
        "/dev/loop1": "/d/volumes/pool/images/v.img",
        "/dev/loop2": "",
    }
    assert loop_devices("") == {}


def test_the_state_file_round_trips_and_drops_empty_views() -> None:
    state = VolumeState({"live": ["vm-b", "vm-a"], "ck-c1": [], "clone-x-c1": ["vm-c"]})
    again = VolumeState.from_json(state.to_json())
    assert again.views == {"live": ["vm-a", "vm-b"], "clone-x-c1": ["vm-c"]}
    assert again.holders() == {"vm-a", "vm-b", "vm-c"}


def test_volume_records_round_trip() -> None:
    rec = VolumeRecord("vol-1", "key", "name", 64 << 20, 1.5, 2.5, used_bytes=10, capacity_bytes=20)
    assert VolumeRecord.from_hash(rec.to_hash()) == rec
    fresh = VolumeRecord("vol-2", "key", "n", 1 << 30, 1.0)
    assert VolumeRecord.from_hash(fresh.to_hash()) == fresh
    ck = VolumeCheckpointRecord("ckpt-1", "vol-1", 3.0, 64 << 20, None, 5)
    assert VolumeCheckpointRecord.from_hash(ck.to_hash()) == ck
