"""``gateway image build --qemu``: the qemu driver's boot image (kernel and initramfs), from Debian packages.

A qemu VM's files are not in this image: they are those of an image of the shared store
(``[images.definitions]``, ``image_variant``), attached as a read-only disk (``qemu_disk``). This image is
what boots any of them, two files and a manifest in one folder:
- ``vmlinux``: the kernel of Debian's ``linux-image-amd64``, unpacked from its bzImage (the payload is XZ;
  LZ4 for the cloud flavour) into the ELF that QEMU's microvm machine boots directly (a PVH note);
- ``initrd.cpio``: a small initramfs: busybox, the virtio (mmio, net, blk), ext4, overlay and 9p
  modules, ``/init`` (``gateway/guest/qemu_init.sh``: it mounts the disk under a tmpfs
  overlay and ``switch_root``s into it) and the agent (``gateway/guest/agent.py``, copied into the
  guest's root, where the image's own Python runs it);
- ``manifest.json``: package versions, the kernel's timer frequency (for ``lpj=``), checksums.

Packages come from the machine's own apt sources (``apt-get download``); nothing else is fetched.
The build runs in a scratch folder beside the target and replaces the target only when complete.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# The generic flavour, not the cloud one: Debian's cloud kernels (6.1 and 6.12) are built without 9p,
# which volumes reach qemu VMs by (QEMU's own virtio-9p server; ``volmount``).
KERNEL_META_PACKAGE = "linux-image-amd64"
# Only busybox: the guest's programs (Python for the agent among them) are the image's own.
GUEST_PACKAGES = ("busybox-static",)
# Loaded in this order by /init; their own dependencies are added from each module's modinfo. (tmpfs is
# built in; crc32c is what ext4 asks the crypto API for, which has no modprobe to load it here.)
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "overlay",
    "qemu_fw_cfg",
    "9pnet_virtio",
    "9p",
)
# Parts of the packages the initramfs never needs.
TRIMMED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/locale")
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
XZ_MAGIC = b"\xfd7zXZ\x00"
GUEST_DIR = Path(__file__).resolve().parents[2] / "guest"
MANIFEST = "manifest.json"
KERNEL = "vmlinux"
INITRD = "initrd.cpio"
COMMAND_TIMEOUT_S = 600


def sources_digest() -> str:
    """What the image is made by: this builder, the guest's init and its agent. An image made by other
    versions of them is stale (an agent that does not speak this gateway's protocol)."""
    digest = hashlib.sha256()
    for path in (Path(__file__), GUEST_DIR / "qemu_init.sh", GUEST_DIR / "agent.py"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ImageError(Exception):
    """The image cannot be built or is not usable; the message says what to do."""


def run(argv: list[str], *, cwd: Path | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as exc:
        raise ImageError(f"`{argv[0]}` is missing: install it (apt-get install {argv[0]})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"`{' '.join(argv)}` timed out") from exc
    if done.returncode != 0:
        raise ImageError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def kernel_package() -> str:
    """The versioned kernel package the cloud meta-package points at (linux-image-6.1.0-NN-cloud-amd64)."""
    out = run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for name in re.findall(r"Depends: (linux-image-[0-9]\S+-amd64)", out):
        return name
    raise ImageError(f"apt knows no kernel behind {KERNEL_META_PACKAGE}: run apt-get update")


def download(packages: Iterable[str], into: Path) -> list[Path]:
    """``apt-get download`` (no install, no scripts run); lists are refreshed once if apt lacks one."""
    argv = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *packages]
    try:
        run(argv, cwd=into)
    except ImageError:
        run(["apt-get", "-q", "update"])
        run(argv, cwd=into)
    return sorted(into.glob("*.deb"))


def unpack_kernel(vmlinuz: Path, out: Path) -> None:
    """bzImage -> ELF vmlinux: the boot protocol's header says where the compressed payload lies."""
    data = vmlinuz.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        raise ImageError(f"{vmlinuz.name} is not a bzImage")
    setup_sects = data[0x1F1] or 4
    offset = (setup_sects + 1) * 512 + int.from_bytes(data[0x248:0x24C], "little")
    length = int.from_bytes(data[0x24C:0x250], "little")
    payload = data[offset : offset + length]
    # The kernel's build appends the unpacked size (4 bytes) to the stream; lz4 would read it as a block.
    size = int.from_bytes(payload[-4:], "little")
    if payload.startswith(XZ_MAGIC):
        out.write_bytes(lzma.decompress(payload[:-4], format=lzma.FORMAT_XZ))
    elif payload.startswith(LZ4_LEGACY_MAGIC):
        packed = out.with_suffix(".lz4")
        packed.write_bytes(payload[:-4])
        run(["lz4", "-d", "-f", "-q", str(packed), str(out)])
        packed.unlink()
    else:
        raise ImageError(f"{vmlinuz.name}: the payload is neither XZ nor LZ4 (Debian's kernels are)")
    if out.stat().st_size != size or out.read_bytes()[:4] != b"\x7fELF":
        raise ImageError(f"{vmlinuz.name}: the unpacked kernel is not the ELF file its header announces")


def module_dependencies(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section (names, not files)."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)", ko.read_bytes())
    return [d for d in (match[1].decode().split(",") if match else []) if d]


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """Each wanted module after its dependencies, each once."""
    # Module names use underscores where some file names have dashes (virtio-rng.ko).
    files = {p.stem.replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in files:
            raise ImageError(f"kernel module {name} is not in the kernel package")
        seen.add(name)
        for dep in module_dependencies(files[name]):
            visit(dep)
        order.append((name, files[name]))

    for name in wanted:
        visit(name)
    return order


def kernel_hz(config_file: Path) -> int:
    match = re.search(r"^CONFIG_HZ=(\d+)$", config_file.read_text(), re.M)
    if not match:
        raise ImageError(f"{config_file.name} names no CONFIG_HZ")
    return int(match[1])


def make_root(packages_dir: Path, root: Path, modules: list[tuple[str, Path]]) -> None:
    for deb in sorted(packages_dir.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(root)])
    for part in TRIMMED:
        shutil.rmtree(root / part, ignore_errors=True)
    for folder in ("proc", "sys", "dev", "tmp", "run", "etc", "lib/modules", "newroot"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    busybox = root / "bin" / "busybox"
    for applet in run([str(busybox), "--list-full"]).split():
        link = root / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(busybox, link.parent))
    for name, ko in modules:
        shutil.copy2(ko, root / "lib/modules" / f"{name}.ko")
    (root / "lib/modules/load-order").write_text("".join(f"{name}\n" for name, _ in modules))
    shutil.copy2(GUEST_DIR / "qemu_init.sh", root / "init")
    os.chmod(root / "init", 0o755)
    (root / "usr/lib/gateway").mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST_DIR / "agent.py", root / "usr/lib/gateway/agent.py")


def write_cpio(root: Path, out: Path) -> None:
    entries = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "".join(f"{e}\n" for e in [".", *entries])
    with open(out, "wb") as fh:
        done = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--reproducible"],
            input=listing.encode(),
            stdout=fh,
            stderr=subprocess.PIPE,
            cwd=root,
            timeout=COMMAND_TIMEOUT_S,
        )
    if done.returncode != 0:
        raise ImageError(f"cpio failed: {done.stderr.decode(errors='replace').strip()}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_image(target: Path, *, say: Callable[[str], None] = print) -> dict:
    """Build the image into ``target`` (replaced only when the build succeeds); return its manifest."""
    if os.geteuid() != 0:
        raise ImageError("building the qemu boot image needs root (its files must be root's)")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as scratch:
        work = Path(scratch)
        debs, kernel_debs, root, out = work / "debs", work / "kernel-debs", work / "root", work / "out"
        for folder in (debs, kernel_debs, root, out):
            folder.mkdir()
        kernel_pkg = kernel_package()
        say(f"downloading {kernel_pkg} and {len(GUEST_PACKAGES)} guest packages with apt-get")
        download([kernel_pkg], kernel_debs)
        download(GUEST_PACKAGES, debs)
        kernel_root = work / "kernel"
        run(["dpkg-deb", "-x", str(next(kernel_debs.glob("*.deb"))), str(kernel_root)])
        release = kernel_pkg.removeprefix("linux-image-")
        say(f"unpacking kernel {release}")
        unpack_kernel(kernel_root / "boot" / f"vmlinuz-{release}", out / KERNEL)
        modules = module_load_order(kernel_root / "lib/modules" / release, GUEST_MODULES)
        say(f"assembling the initramfs ({len(modules)} modules)")
        make_root(debs, root, modules)
        write_cpio(root, out / INITRD)
        versions = {}
        for deb in [*debs.glob("*.deb"), *kernel_debs.glob("*.deb")]:
            name, version = run(["dpkg-deb", "-W", "--showformat=${Package} ${Version}", str(deb)]).split()
            versions[name] = version
        manifest = {
            "kernel_release": release,
            "kernel_hz": kernel_hz(kernel_root / "boot" / f"config-{release}"),
            "packages": dict(sorted(versions.items())),
            "modules": [name for name, _ in modules],
            "files": {name: sha256(out / name) for name in (KERNEL, INITRD)},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": sources_digest(),
        }
        manifest["image_id"] = hashlib.sha256(
            json.dumps(manifest["files"], sort_keys=True).encode()
        ).hexdigest()[:16]
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        out.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    size_mb = (target / INITRD).stat().st_size / 2**20
    say(
        f"boot image {manifest['image_id']} in {target} ({size_mb:.1f} MiB initramfs), "
        f"built in {time.monotonic() - started:.0f} s"
    )
    return manifest


def load_manifest(image_dir: Path) -> dict:
    """The manifest of a built image, or ImageError saying how to build one."""
    try:
        manifest = json.loads((image_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        raise ImageError(f"no qemu boot image in {image_dir}: run `gateway image build --qemu`") from None
    for name in (KERNEL, INITRD):
        if not (image_dir / name).is_file():
            raise ImageError(
                f"the qemu boot image in {image_dir} lacks {name}: run `gateway image build --qemu`"
            )
    if manifest.get("sources") != sources_digest():
        raise ImageError(
            f"the qemu boot image in {image_dir} was built by another version of the gateway: "
            "run `gateway image build --qemu`"
        )
    return manifest
