"""The qemu driver's confinement helpers: which ids QEMUs may run as, and how the gateway reaches a
control socket that lives in a folder a (possibly hostile) QEMU can write. No QEMU is started."""

from __future__ import annotations

import grp
import os
import pwd
import socket
from pathlib import Path

import pytest

from gateway.errors import DriverError
from gateway.orchestrator.drivers import qemu_jail


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_each_slot_and_the_probe_have_ids_of_their_own() -> None:
    ids = [qemu_jail.probe_ids(2_000_000), *(qemu_jail.vm_ids(2_000_000, slot) for slot in range(5))]
    assert ids == [2_000_000, 2_000_001, 2_000_002, 2_000_003, 2_000_004, 2_000_005]


def test_the_default_ids_are_free_here() -> None:
    qemu_jail.check_ids(2_000_000, 32766)


@pytest.mark.parametrize("base", [0, 1000, 65535, 2**32 - 100])
def test_privileged_or_out_of_range_ids_are_refused(base: int) -> None:
    with pytest.raises(DriverError, match=r"qemu\.id_base"):
        qemu_jail.check_ids(base, 1000)


def test_ids_of_an_account_or_a_group_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    account = pwd.struct_passwd(("svc", "x", 2_000_007, 100, "", "/", "/bin/false"))
    monkeypatch.setattr(qemu_jail.pwd, "getpwall", lambda: [account])
    with pytest.raises(DriverError, match=r"uid 2000007 \(svc\) is an account"):
        qemu_jail.check_ids(2_000_000, 100)
    qemu_jail.check_ids(2_000_000, 6)  # the slots stop below it
    monkeypatch.setattr(qemu_jail.pwd, "getpwall", list)
    group = grp.struct_group(("staff2", "x", 2_000_000, []))
    monkeypatch.setattr(qemu_jail.grp, "getgrall", lambda: [group])
    with pytest.raises(DriverError, match=r"gid 2000000 \(staff2\)"):
        qemu_jail.check_ids(2_000_000, 100)  # the probe's id counts too


def test_subordinate_ranges_are_read_and_overlaps_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\n# a comment\nbob:1999990:65536\nbroken-line\n")
    assert qemu_jail.subordinate_ranges(subuid) == [("alice", 100000, 65536), ("bob", 1999990, 65536)]
    assert qemu_jail.subordinate_ranges(tmp_path / "missing") == []
    real = qemu_jail.subordinate_ranges

    def fake(path: Path) -> list[tuple[str, int, int]]:
        return real(subuid) if path.name == "subuid" else []

    monkeypatch.setattr(qemu_jail, "subordinate_ranges", fake)
    with pytest.raises(DriverError, match="bob's range in /etc/subuid"):
        qemu_jail.check_ids(2_000_000, 100)
    qemu_jail.check_ids(3_000_000, 100)  # past bob's range


def test_the_socket_is_reached_through_a_descriptor_of_that_very_socket(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with listening(path) as server, qemu_jail.open_socket(path, os.geteuid()) as safe:
        assert str(safe).startswith("/proc/self/fd/")
        # Renaming another socket over the name after the check changes nothing: the descriptor holds.
        with listening(tmp_path / "other.sock") as other:
            os.replace(tmp_path / "other.sock", path)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(safe))
                conn, _ = server.accept()
                conn.close()
            other.setblocking(False)
            with pytest.raises(BlockingIOError):
                other.accept()


def test_a_link_planted_where_the_socket_should_be_is_refused(tmp_path: Path) -> None:
    # A QEMU that escaped its guest can write its socket's folder: it must not point the gateway at
    # another VM's QEMU (or any other socket or file) by a symbolic link.
    victim = tmp_path / "victim.sock"
    with listening(victim):
        (tmp_path / "qmp.sock").symlink_to(victim)
        with pytest.raises(DriverError, match="not the control socket"):
            with qemu_jail.open_socket(tmp_path / "qmp.sock", os.geteuid()):
                pass


def test_a_socket_of_another_uid_or_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with listening(path):
        with pytest.raises(DriverError, match="not the control socket"):
            with qemu_jail.open_socket(path, os.geteuid() + 1):
                pass
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(DriverError, match="not the control socket"):
        with qemu_jail.open_socket(path, os.geteuid()):
            pass


def test_waiting_for_the_socket_stops_when_qemu_is_gone(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="exited before"):
        with qemu_jail.open_socket(tmp_path / "never.sock", 0, alive=lambda: False):
            pass
    with pytest.raises(DriverError, match="did not appear"):
        with qemu_jail.open_socket(tmp_path / "never.sock", 0, timeout_s=0.05):
            pass


def test_the_image_files_become_readable_by_the_unprivileged_qemu(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0")
    kernel.chmod(0o600)
    qemu_jail.readable_by_all(kernel)
    assert kernel.stat().st_mode & 0o777 == 0o644


def test_qemu_outside_usr_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    with pytest.raises(DriverError, match="must be installed there"):
        qemu_jail.host_tools(str(fake))
