"""Images through the API (the templates list, image_variant on VM create, the instance catalog's rootfs)
and, marked slow, a real build of the default image with mmdebstrap."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import DriverError
from gateway.images.store import ImageStore
from gateway.orchestrator import service
from gateway.orchestrator.drivers.base import VmSpec
from tests.conftest import GatewayUnderTest
from tests.integration.test_api_validation import detail_of, redis_snapshot
from tests.integration.test_cli import gateway as run_gateway
from tests.integration.test_instances import ORG_A, create_instance, org_key

SHIPPED = ["default", "python-data", "browser"]


def record_specs(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False
) -> list[VmSpec]:
    """Every VmSpec the gateway's driver is asked to create (and, with ``fail``, a driver error for each)."""
    driver = gw.services.orchestrator.driver
    specs: list[VmSpec] = []
    create = driver.create

    async def recording(spec: VmSpec) -> Any:
        specs.append(spec)
        if fail:
            raise DriverError("refused by the test")
        return await create(spec)

    monkeypatch.setattr(driver, "create", recording)
    return specs


async def test_templates_list_the_defined_images_without_a_key(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("GET", "/v1/templates", anonymous=True)
    assert status == 200, body
    assert body["total"] == 3
    templates = {t["slug"]: t for t in body["templates"]}
    assert list(templates) == SHIPPED
    default = templates["default"]
    assert set(default) == {
        "slug", "name", "description", "packages", "suite", "digest", "built", "default", "size_bytes",
        "built_at",
    }  # fmt: skip
    assert (default["name"], default["default"], default["suite"]) == ("default", True, "bookworm")
    assert {"python3", "git", "build-essential"} <= set(default["packages"])
    assert len(default["digest"]) == 16
    # This test gateway's data folder has none built (the process driver runs on the host's files).
    assert [t["built"] for t in templates.values()] == [False, False, False]
    assert not templates["browser"]["default"] and "chromium" in templates["browser"]["packages"]

    status, one = await gw.request("GET", "/v1/templates/python-data", anonymous=True)
    assert (status, one) == (200, templates["python-data"])
    status, missing = await gw.request("GET", "/v1/templates/nope", anonymous=True)
    assert (status, missing["code"]) == (404, "template_not_found")


async def test_image_variant_reaches_the_driver_and_the_vm_view(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = record_specs(gw, monkeypatch)
    status, vm = await gw.request("POST", "/v1/vms", json={"image_variant": "python-data"})
    assert (status, vm["status"]) == (200, "active"), vm
    status, view = await gw.request("GET", f"/v1/vms/{vm['vm_id']}")
    assert view["image_variant"] == "python-data"
    status, plain = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, plain
    status, listed = await gw.request("GET", "/v1/vms")
    assert {v["vm_id"]: v["image_variant"] for v in listed} == {
        vm["vm_id"]: "python-data",
        plain["vm_id"]: "default",
    }
    assert [s.image for s in specs] == ["python-data", "default"]


async def test_an_unknown_image_variant_is_a_422_listing_the_available_ones(gw: GatewayUnderTest) -> None:
    before = await redis_snapshot(gw)
    status, body = await gw.request("POST", "/v1/vms", json={"image_variant": "windows"})
    assert status == 422
    [problem] = detail_of(body)
    assert (problem["loc"], problem["type"]) == (["body", "image_variant"], "unsupported")
    assert problem["msg"] == "unknown image variant 'windows'; available: default, python-data, browser"
    assert await redis_snapshot(gw) == before


async def test_an_image_that_is_not_built_is_refused_where_vms_run_on_images(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if this driver ran VMs on images (netns does): none is built in this gateway's data folder.
    monkeypatch.setattr(service, "ROOTFS_DRIVERS", frozenset({gw.services.orchestrator.driver.name}))
    token = await org_key(gw, ORG_A)
    before = await redis_snapshot(gw)
    status, body = await gw.request("POST", "/v1/vms", json={"image_variant": "python-data"})
    assert status == 422
    [problem] = detail_of(body)
    assert (problem["loc"], problem["type"]) == (["body", "image_variant"], "unsupported")
    assert problem["msg"] == (
        "image 'python-data' is not built on this gateway: run `gateway image build python-data`"
    )
    status, body = await create_instance(gw, token)
    assert status == 422
    [problem] = detail_of(body)
    assert problem["loc"] == ["body", "image"]
    assert problem["msg"] == (
        "image 'debian-12' cannot run on this gateway yet: its root file system image 'browser' is not "
        "built on this gateway: run `gateway image build browser`"
    )
    assert await redis_snapshot(gw) == before


async def test_a_browser_instance_runs_on_its_catalog_entrys_image(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = record_specs(gw, monkeypatch, fail=True)
    status, body = await create_instance(gw, await org_key(gw, ORG_A))
    assert (status, body["code"]) == (503, "instance_failed")  # (the recording driver refused it)
    assert [s.image for s in specs] == ["browser"]


def test_the_command_line_lists_and_builds_images(tmp_path: Path) -> None:
    listed = run_gateway("--data-dir", str(tmp_path), "image", "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [(name, "not built") for name in SHIPPED]
    assert rows[0][3].endswith("(the default)") and len(rows[0][2]) == 16
    refused = run_gateway("--data-dir", str(tmp_path), "image", "build", "nope", "default")
    assert refused.returncode == 1
    assert "no image nope in [images.definitions]; defined: default, python-data, browser" in refused.stderr
    mixed = run_gateway("--data-dir", str(tmp_path), "image", "build", "--qemu", "default")
    assert (mixed.returncode, "--qemu builds the qemu boot image only" in mixed.stderr) == (1, True)
    # Built and current (as a build leaves it): nothing to do.
    folder = tmp_path / "images" / "rootfs" / "default" / rows[0][2]
    (folder / "rootfs").mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    again = run_gateway("--data-dir", str(tmp_path), "image", "build")
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"image default is built and current ({rows[0][2]}): {folder}\n"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_default_image_is_debian_with_what_sandboxes_run(rootfs_images: ImageStore) -> None:
    # Built on first use into the shared cache (about 45 s), reused while its definition is unchanged.
    rootfs = rootfs_images.rootfs("default")
    digest = rootfs_images.digest("default")
    assert rootfs == Path(rootfs_images.root, "default", digest, "rootfs")
    manifest = rootfs_images.manifest("default")
    assert manifest is not None
    assert (manifest["name"], manifest["digest"], manifest["suite"]) == ("default", digest, "bookworm")
    definition = rootfs_images.definition("default")
    assert manifest["requested"] == list(definition.packages)
    assert set(definition.packages) <= set(manifest["packages"])  # with versions, from its dpkg status
    assert manifest["packages"]["python3"].startswith("3.11")
    assert 100 * 2**20 < manifest["size_bytes"] < 2 * 2**30

    def run(*argv: str) -> str:
        done = subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run("python3", "-c", "import sys, venv, ssl; print(sys.version_info[:2])") == "(3, 11)\n"
    assert run("git", "--version").startswith("git version 2.")
    assert run("sh", "-c", "for c in gcc make curl pip3; do command -v $c; done").count("\n") == 4
    # Fitted for a sandbox.
    etc = rootfs / "etc"
    assert (etc / "hostname").read_text() == "sandbox\n"
    assert "sandbox" in (etc / "hosts").read_text()
    resolv = etc / "resolv.conf"
    assert resolv.is_file() and not resolv.is_symlink() and resolv.read_text() == ""
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (rootfs / "root").is_dir() and (rootfs / "home" / "user").is_dir()
    # Without manual pages, documentation (copyright files stay) or translations.
    assert not any((rootfs / "usr/share/man").rglob("*.gz"))
    # (Some entries are symlinks to other packages' folders: absolute, so never followed from here.)
    docs = [p for p in (rootfs / "usr/share/doc").rglob("*") if p.is_file() and not p.is_symlink()]
    assert docs and all(p.name == "copyright" for p in docs)
    assert not any(p.is_file() and not p.is_symlink() for p in (rootfs / "usr/share/locale").rglob("*"))
