"""The guest image's pure parts: which images are usable, module order, the kernel's payload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.orchestrator.drivers import qemu_image
from gateway.orchestrator.drivers.qemu_net import guest_half, host_half, plan_slot, slot_capacity


def write_image(folder: Path, sources: str) -> None:
    folder.mkdir()
    for name in (qemu_image.KERNEL, qemu_image.INITRD):
        (folder / name).write_bytes(b"x")
    (folder / qemu_image.MANIFEST).write_text(json.dumps({"image_id": "i", "sources": sources}))


def test_an_image_built_by_these_sources_is_used(tmp_path: Path) -> None:
    write_image(tmp_path / "img", qemu_image.sources_digest())
    assert qemu_image.load_manifest(tmp_path / "img")["image_id"] == "i"


def test_an_image_built_by_another_version_is_stale(tmp_path: Path) -> None:
    """(An upgraded gateway once booted an old image whose agent lacked /configure: every create failed.)"""
    write_image(tmp_path / "img", "0123456789abcdef")
    with pytest.raises(qemu_image.ImageError, match="another version"):
        qemu_image.load_manifest(tmp_path / "img")


def test_a_missing_image_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(qemu_image.ImageError, match="gateway image build"):
        qemu_image.load_manifest(tmp_path / "none")


def fake_module(folder: Path, name: str, depends: str) -> None:
    (folder / f"{name}.ko").write_bytes(b"\x7fELF...\x00license=GPL\x00depends=" + depends.encode() + b"\x00")


def test_modules_load_after_their_dependencies_each_once(tmp_path: Path) -> None:
    fake_module(tmp_path, "virtio_ring", "")
    fake_module(tmp_path, "virtio", "virtio_ring")
    fake_module(tmp_path, "virtio_net", "virtio_ring,virtio,net_failover")
    fake_module(tmp_path, "net_failover", "failover")
    fake_module(tmp_path, "failover", "")
    fake_module(tmp_path, "virtio-rng", "virtio,virtio_ring")
    order = [name for name, _ in qemu_image.module_load_order(tmp_path, ["virtio_net", "virtio_rng"])]
    assert order == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net", "virtio_rng"]
    with pytest.raises(qemu_image.ImageError, match="not in the kernel package"):
        qemu_image.module_load_order(tmp_path, ["virtio_blk"])


def test_guest_and_host_addresses_never_share_a_half() -> None:
    cidr = "172.29.0.0/16"
    assert (str(guest_half(cidr)), str(host_half(cidr))) == ("172.29.0.0/17", "172.29.128.0/17")
    plans = [plan_slot(cidr, "gq", s) for s in (0, 1, slot_capacity(cidr) - 1)]
    assert [(p.vm_ip, p.host_ip) for p in plans] == [
        ("172.29.0.1", "172.29.128.1"),
        ("172.29.0.2", "172.29.128.2"),
        ("172.29.127.254", "172.29.255.254"),
    ]
    assert [(p.namespace, p.veth) for p in plans[:1]] == [("gq-0", "gqh0")]
