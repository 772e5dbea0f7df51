"""Root file system images: definitions and their digest, the [images] config, the store, the builder's
pieces that need no network (the build itself: tests/integration/test_images.py, marked slow)."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_ROOTFS_IMAGES,
    Config,
    ConfigError,
    load_config,
)
from gateway.errors import DriverError
from gateway.images import builder, store
from gateway.images.builder import ImageError
from gateway.images.definitions import ImageDefinition, definition_digest
from gateway.images.store import ImageStore, image_store
from gateway.orchestrator.service import Orchestrator

BASE = ImageDefinition("base", "a base", ("bash", "python3"))


# definitions ---------------------------------------------------------------------------------------


def test_the_digest_is_16_hex_characters_and_stable() -> None:
    digest = definition_digest(BASE)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert definition_digest(ImageDefinition("base", "a base", ("bash", "python3"))) == digest


@pytest.mark.parametrize(
    ("changed", "same"),
    [
        (dataclasses.replace(BASE, packages=("bash", "python3", "git")), False),
        (dataclasses.replace(BASE, suite="trixie"), False),
        (dataclasses.replace(BASE, packages=("python3", "bash")), True),  # a set: order does not matter
        (dataclasses.replace(BASE, packages=("bash", "python3", "bash")), True),
        (dataclasses.replace(BASE, name="renamed", description="described anew"), True),
    ],
)
def test_the_digest_follows_what_the_files_depend_on(changed: ImageDefinition, same: bool) -> None:
    assert (definition_digest(changed) == definition_digest(BASE)) is same


def test_a_new_builder_version_is_a_new_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    before = definition_digest(BASE)
    monkeypatch.setattr(builder, "BUILDER_VERSION", builder.BUILDER_VERSION + "-next")
    assert definition_digest(BASE) != before


def test_mmdebstrap_is_asked_for_minbase_and_the_packages_without_docs(tmp_path: Path) -> None:
    assert builder.mmdebstrap_argv(BASE, tmp_path / "rootfs") == [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--include=bash,python3",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "bookworm",
        str(tmp_path / "rootfs"),
    ]
    assert not any(a.startswith("--include") for a in builder.mmdebstrap_argv(
        dataclasses.replace(BASE, packages=()), tmp_path))  # fmt: skip


# config --------------------------------------------------------------------------------------------


def test_the_shipped_definitions() -> None:
    images = load_config(DEFAULT_CONFIG_PATH, environ={}).images
    assert images == Config().images
    assert (images.dir, images.default) == ("", "default")
    assert list(images.definitions) == ["default", "python-data", "browser"]
    default = set(images.definitions["default"].packages)
    assert {"python3", "python3-pip", "python3-venv", "git", "curl", "build-essential"} <= default
    assert set(images.definitions["python-data"].packages) == default | {"python3-numpy", "python3-pandas"}
    assert "chromium" in images.definitions["browser"].packages
    assert images.definitions == DEFAULT_ROOTFS_IMAGES
    assert Config().instances.images["debian-12"].rootfs == "browser"
    assert Config().instances.images["windows-10"].rootfs == "default"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[images]\ndefinitions = 1\n", r"tables \[images.definitions.<name>\]"),
        ("[images]\ncolour = 'red'\n", r"unknown setting\(s\) in \[images\]"),
        ("[images.definitions.Big]\npackages = ['bash']\n", "images.definitions.Big: names are lower-case"),
        ("[images.definitions.a_b]\npackages = ['bash']\n", "images.definitions.a_b: names"),
        ("[images.definitions.default]\npackages = ['Bash']\n", r"'Bash' is not a Debian package name"),
        ("[images.definitions.default]\npackages = ['a']\n", r"'a' is not a Debian package name"),
        ("[images.definitions.default]\npackages = ['x; rm -rf /']\n", "not a Debian package name"),
        ("[images.definitions.default]\npackages = 'bash'\n", "list of strings"),
        ("[images.definitions.default]\nsuite = '../x'\n", "not a Debian suite name"),
        (
            "[images.definitions.default]\nsize = 1\n",
            r"unknown setting\(s\) in \[images.definitions.default\]",
        ),
        ("[images]\ndefault = 'nope'\n", r"images.default: 'nope' is not an image"),
        # A table replaces the shipped one as a whole: the browser instances' image needs its rootfs too.
        (
            "[images.definitions.default]\npackages = ['bash']\n",
            r"instances.images.debian-12.rootfs: 'browser'",
        ),
        (
            "[instances.images.kiosk]\ncommand = ['x']\nport = 1\ndrivers = ['netns']\nrootfs = 'nope'\n",
            r"instances.images.kiosk.rootfs: 'nope' is not an image of \[images.definitions\]",
        ),
    ],
)
def test_invalid_image_settings_name_the_setting(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_definitions_and_settings_from_the_toml_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[images]\ndefault = 'tiny'\n"
        "[images.definitions.tiny]\ndescription = 'just bash'\npackages = ['bash', 'g++', 'libc6.1']\n"
        "[images.definitions.next]\npackages = []\nsuite = 'trixie'\n"
        "[instances.images.kiosk]\ncommand = ['x']\nport = 1\ndrivers = ['netns']\nrootfs = 'next'\n"
    )
    config = load_config(
        path, environ={"GATEWAY_IMAGES_DIR": "/srv/images", "GATEWAY_IMAGES_DEFAULT": "next"}
    )
    images = config.images
    assert (images.dir, images.default, list(images.definitions)) == ("/srv/images", "next", ["tiny", "next"])
    assert images.definitions["tiny"].packages == ("bash", "g++", "libc6.1")
    assert images.definitions["next"].suite == "trixie"
    built = image_store(config)
    assert built.root == Path("/srv/images") and built.default == "next"
    assert built.definition("tiny") == ImageDefinition("tiny", "just bash", ("bash", "g++", "libc6.1"))


def test_the_store_lives_in_the_data_folder_by_default(tmp_path: Path) -> None:
    config = load_config(environ={"GATEWAY_SERVER_DATA_DIR": str(tmp_path)})
    assert image_store(config).root == tmp_path / "images" / "rootfs"


# store ---------------------------------------------------------------------------------------------


def make_store(root: Path) -> ImageStore:
    definitions = {
        "default": ImageDefinition("default", "the default", ("bash",)),
        "big": ImageDefinition("big", "more", ("bash", "git")),
    }
    return ImageStore(root, definitions)


def fake_build(calls: list[str]):  # type: ignore[no-untyped-def]
    """A build_rootfs that makes what a real build leaves, without mmdebstrap."""

    def build(definition: ImageDefinition, target: Path, *, say, cancel=None) -> dict:  # type: ignore[no-untyped-def]
        calls.append(definition.name)
        say(f"built {definition.name}")
        (target / builder.ROOTFS / "usr").mkdir(parents=True)
        manifest = {"name": definition.name, "digest": definition_digest(definition), "size_bytes": 5}
        (target / builder.MANIFEST).write_text(builder.json.dumps(manifest))
        return manifest

    return build


def test_names_resolve_to_defined_images(tmp_path: Path) -> None:
    images = make_store(tmp_path)
    assert images.names() == ["default", "big"]
    assert [images.resolve(v) for v in (None, "", "default", "big", "nope")] == [
        "default", "default", "default", "big", "nope"
    ]  # fmt: skip
    other = ImageStore(tmp_path, {"base": BASE}, default="base")
    assert other.resolve("default") == "base"  # "default" means the default where no image has that name
    with pytest.raises(DriverError, match=r"unknown image 'nope'; defined: default, big"):
        images.definition("nope")
    with pytest.raises(DriverError, match="unknown image"):
        images.rootfs("nope")


def test_an_unbuilt_image_says_how_to_build_it(tmp_path: Path) -> None:
    images = make_store(tmp_path)
    assert not images.is_built("big")
    with pytest.raises(
        DriverError, match=r"image big is not built on this gateway: run `gateway image build big`"
    ):
        images.rootfs("big")
    with pytest.raises(DriverError, match="gateway image build default"):
        images.rootfs("")


def test_ensure_builds_once_and_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(store, "build_rootfs", fake_build(calls))
    images = make_store(tmp_path)
    said: list[str] = []
    # What a killed build left behind is removed before the next one.
    (tmp_path / "default" / ".build-dead" / "out").mkdir(parents=True)
    rootfs = images.ensure("default", said.append)
    digest = definition_digest(images.definition("default"))
    assert rootfs == tmp_path / "default" / digest / "rootfs" == images.rootfs("default")
    assert images.is_built("default") and images.is_built("")
    assert said == ["built default"] and calls == ["default"]
    assert images.ensure("", said.append) == rootfs  # built and current: nothing to do
    assert calls == ["default"]
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == [".lock", digest]
    assert images.manifest("default")["digest"] == digest  # type: ignore[index]


def test_a_changed_definition_builds_beside_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(store, "build_rootfs", fake_build(calls))
    old = make_store(tmp_path)
    old_rootfs = old.ensure("big", lambda _line: None)
    new = ImageStore(tmp_path, {"big": ImageDefinition("big", "more", ("bash", "git", "curl"))}, "big")
    assert not new.is_built("big")
    new_rootfs = new.ensure("big", lambda _line: None)
    assert new_rootfs != old_rootfs and old_rootfs.is_dir()  # a VM may still run on the old one
    said: list[str] = []
    new.ensure("big", said.append, remove_stale=True)
    assert not old_rootfs.exists() and new_rootfs.is_dir()
    assert said == [f"image big: removing {old_rootfs.parent.name} (older definition or builder)"]
    assert calls == ["big", "big"]


def test_a_failed_build_is_a_driver_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*_args: object, **_kwargs: object) -> dict:
        raise ImageError("cannot build image default: mirror unreachable")

    monkeypatch.setattr(store, "build_rootfs", failing)
    with pytest.raises(DriverError, match="mirror unreachable"):
        make_store(tmp_path).ensure("default", lambda _line: None)


def test_describe_lists_every_definition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "build_rootfs", fake_build([]))
    images = make_store(tmp_path)
    images.ensure("big", lambda _line: None)
    views = {v["name"]: v for v in images.describe()}
    assert views["default"] == {
        "name": "default",
        "description": "the default",
        "packages": ["bash"],
        "suite": "bookworm",
        "digest": images.digest("default"),
        "built": False,
        "default": True,
        "size_bytes": None,
        "built_at": None,
    }
    assert (views["big"]["built"], views["big"]["default"], views["big"]["size_bytes"]) == (True, False, 5)


# builder pieces ------------------------------------------------------------------------------------


def test_the_root_is_fitted_for_a_sandbox(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    (rootfs / "etc" / "hostname").write_text("buildhost\n")
    os.chmod(rootfs / "etc" / "hostname", 0o755)
    builder.fit_for_sandbox(rootfs)
    resolv = rootfs / "etc" / "resolv.conf"
    assert not resolv.is_symlink() and resolv.is_file() and resolv.read_text() == ""
    assert (rootfs / "etc" / "hostname").read_text() == "sandbox\n"
    assert (rootfs / "etc" / "hostname").stat().st_mode & 0o777 == 0o644
    hosts = (rootfs / "etc" / "hosts").read_text()
    assert "127.0.0.1\tlocalhost\n" in hosts and "\tsandbox\n" in hosts
    modes = {d: (rootfs / d).stat().st_mode & 0o7777 for d in ("root", "tmp", "home/user")}
    assert modes == {"root": 0o700, "tmp": 0o1777, "home/user": 0o755}


def test_installed_packages_come_from_the_roots_dpkg_status(tmp_path: Path) -> None:
    status = tmp_path / "var" / "lib" / "dpkg" / "status"
    status.parent.mkdir(parents=True)
    entry = "Package: {}\nStatus: {}\nVersion: {}\nArchitecture: amd64\nMaintainer: m\nDescription: d\n\n"
    status.write_text(
        entry.format("python3", "install ok installed", "3.11.2-1+b1")
        + entry.format("removed", "deinstall ok config-files", "1.0")
        + entry.format("bash", "install ok installed", "5.2.15-2+b7")
    )
    assert builder.installed_packages(tmp_path) == {"bash": "5.2.15-2+b7", "python3": "3.11.2-1+b1"}


def test_output_is_streamed_and_a_failure_quotes_its_tail() -> None:
    said: list[str] = []
    builder.run_streamed(["sh", "-c", "echo one; echo two >&2"], said.append)
    assert said == ["one", "two"]
    with pytest.raises(ImageError, match=r"failed \(exit status 3\); its last lines:\nE: no such package"):
        builder.run_streamed(["sh", "-c", "echo E: no such package >&2; exit 3"], lambda _line: None)
    with pytest.raises(ImageError, match=r"`no-such-builder` is missing: install it"):
        builder.run_streamed(["no-such-builder"], lambda _line: None)


def test_a_build_that_runs_too_long_or_is_cancelled_is_stopped() -> None:
    with pytest.raises(ImageError, match=r"stopped: it did not finish within 0 s"):
        builder.run_streamed(["sleep", "30"], lambda _line: None, timeout_s=0.2)
    cancel = threading.Event()
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    with pytest.raises(ImageError, match="stopped: it was cancelled"):
        # The child of the shell holds the pipe too: the whole process group is stopped.
        builder.run_streamed(["sh", "-c", "sleep 30; echo late"], lambda _line: None, cancel=cancel)
    timer.join()


def test_building_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder.os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError, match=r"needs root .*run `gateway image build base` as root"):
        builder.build_rootfs(BASE, tmp_path / "base", say=lambda _line: None)


def test_remove_tree_removes_a_plain_folder(tmp_path: Path) -> None:
    (tmp_path / "build" / "rootfs" / "etc").mkdir(parents=True)
    assert builder.mount_points_under(tmp_path / "build") == []
    builder.remove_tree(tmp_path / "build")
    builder.remove_tree(tmp_path / "build")  # gone already: nothing to do
    assert not (tmp_path / "build").exists()


# what the API refuses ------------------------------------------------------------------------------


def orchestrator_on(driver: str, tmp_path: Path) -> Orchestrator:
    config = load_config(environ={"GATEWAY_SERVER_DATA_DIR": str(tmp_path)})
    return Orchestrator(store=None, driver=SimpleNamespace(name=driver), config=config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("driver", "variant", "problem", "recorded"),
    [
        (
            "netns",
            None,
            "image 'default' is not built on this gateway: run `gateway image build default`",
            "default",
        ),
        ("netns", "python-data", "image 'python-data' is not built", "python-data"),
        ("netns", "windows", "unknown image variant 'windows'; available: default, python-data, browser", ""),
        ("process", "python-data", None, "python-data"),
        ("process", "", None, "default"),
        ("process", "nope", "unknown image variant 'nope'", ""),
        # qemu runs on the same images as netns (a disk made from the built root): the same answers.
        ("qemu", None, "image 'default' is not built on this gateway", "default"),
        ("qemu", "python-data", "image 'python-data' is not built", "python-data"),
        ("qemu", "windows", "unknown image variant 'windows'; available: default, python-data, browser", ""),
        ("other", "default", None, ""),
        ("other", "python-data", "the 'other' VM driver runs on no images", ""),
    ],
)
def test_what_each_driver_accepts(
    tmp_path: Path, driver: str, variant: str | None, problem: str | None, recorded: str
) -> None:
    orchestrator = orchestrator_on(driver, tmp_path)
    found = orchestrator.image_problem(variant)
    assert (found is None) if problem is None else (found is not None and found.startswith(problem)), found
    if problem is None or (driver in ("netns", "qemu") and "not built" in problem):
        assert orchestrator.image_name(variant) == recorded


def test_a_built_image_is_accepted_on_netns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "build_rootfs", fake_build([]))
    orchestrator = orchestrator_on("netns", tmp_path)
    orchestrator.images.ensure("python-data", lambda _line: None)
    assert orchestrator.image_problem("python-data") is None
    assert orchestrator.image_problem(None) is not None  # the default is not built here
