"""``gateway image build NAME``: a VM root file system made from Debian packages with ``mmdebstrap``.

An image is a folder ``<root>/<name>/<digest>/`` holding:
- ``rootfs/``: Debian's ``minbase`` variant (Essential packages and apt) plus the definition's packages
  and their dependencies, without manual pages, documentation (copyright files kept) or translations,
  then fitted for a sandbox (hostname, hosts, an empty resolv.conf, /root, /tmp, /home/user);
- ``manifest.json``: name, digest, the packages asked for, every installed package with its version
  (from the root file system's own dpkg status), size, build time.

Packages come from Debian's mirror as mmdebstrap's defaults name it (deb.debian.org, with the suite's
updates and security archives); nothing else is fetched. The build runs in a scratch folder beside the
target and replaces the target only when complete, like the qemu boot image's builder.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.images.definitions import ImageDefinition, definition_digest

# Part of every image's digest: bump it when what this module makes changes (mmdebstrap's options, the
# post-processing), so images made by the old builder are rebuilt.
BUILDER_VERSION = "1"
MANIFEST = "manifest.json"
ROOTFS = "rootfs"
# The default set takes about 50 s here; a browser image several minutes on a slow mirror.
BUILD_TIMEOUT_S = 1800
WATCH_INTERVAL_S = 0.5
STOP_GRACE_S = 30.0
# Lines of mmdebstrap's output quoted in the error when it fails.
OUTPUT_TAIL_LINES = 25
SANDBOX_HOSTNAME = "sandbox"
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
)
HOSTS = (
    "127.0.0.1\tlocalhost\n"
    f"127.0.1.1\t{SANDBOX_HOSTNAME}\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)


class ImageError(Exception):
    """The image cannot be built; the message says what to do."""


def mmdebstrap_argv(definition: ImageDefinition, rootfs: Path) -> list[str]:
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase"]
    if definition.packages:
        argv.append("--include=" + ",".join(definition.packages))
    argv += [f"--dpkgopt={option}" for option in DPKG_OPTIONS]
    return [*argv, definition.suite, str(rootfs)]


def signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def run_streamed(
    argv: list[str],
    say: Callable[[str], None],
    *,
    timeout_s: float = BUILD_TIMEOUT_S,
    cancel: threading.Event | None = None,
) -> None:
    """Run ``argv``, handing each line of its output (stdout and stderr) to ``say`` as it comes.

    On failure the error quotes the output's last lines. On timeout, or when ``cancel`` is set, the
    process group gets SIGTERM (mmdebstrap then unmounts what it mounted in the root file system) and,
    STOP_GRACE_S later, SIGKILL.
    """
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            # Its own process group: stopping it stops apt and dpkg under it too (they hold the pipe).
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise ImageError(f"`{argv[0]}` is missing: install it (apt-get install {argv[0]})") from exc
    ended = threading.Event()
    stopped_because: list[str] = []

    def stop(reason: str) -> None:
        stopped_because.append(reason)
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        signal_group(proc, signal.SIGKILL)

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not ended.wait(WATCH_INTERVAL_S):
            if cancel is not None and cancel.is_set():
                return stop("it was cancelled")
            if time.monotonic() >= deadline:
                return stop(f"it did not finish within {timeout_s:.0f} s")

    watcher = threading.Thread(target=watch, name=f"watch {argv[0]}", daemon=True)
    watcher.start()
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    with proc:  # (closes the pipe)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                if line:
                    tail.append(line)
                    say(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # say() raised: the build must not outlive its caller
                stop("its caller failed")
            ended.set()
            watcher.join()
    output = "\n".join(tail)
    if stopped_because:
        raise ImageError(f"`{argv[0]}` was stopped: {stopped_because[0]}; its last lines:\n{output}")
    if code != 0:
        raise ImageError(f"`{argv[0]}` failed (exit status {code}); its last lines:\n{output}")


def installed_packages(rootfs: Path) -> dict[str, str]:
    """Every package installed in ``rootfs``, with its version, from the root file system's dpkg status."""
    argv = [
        "dpkg-query",
        f"--admindir={rootfs / 'var/lib/dpkg'}",
        "-W",
        "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ImageError(f"dpkg-query failed on {rootfs}: {done.stderr.strip()}")
    packages = {}
    for line in done.stdout.splitlines():
        name, version, status = line.split("\t")
        if status.startswith("ii"):
            packages[name] = version
    return dict(sorted(packages.items()))


def fit_for_sandbox(rootfs: Path) -> None:
    """What every VM expects of its root, beyond what the packages install."""
    etc = rootfs / "etc"
    # Written anew, not over: mmdebstrap leaves the host's copies (with the host's modes), and
    # resolv.conf may be a symlink. resolv.conf is a regular, empty file: VMs have no DNS yet, and a file
    # that exists can be bind-mounted over when they do.
    for name, text in (("hostname", f"{SANDBOX_HOSTNAME}\n"), ("hosts", HOSTS), ("resolv.conf", "")):
        path = etc / name
        path.unlink(missing_ok=True)
        path.write_text(text)
        os.chmod(path, 0o644)
    for folder, mode in (("root", 0o700), ("tmp", 0o1777), ("home/user", 0o755)):
        path = rootfs / folder
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)


def tree_size(root: Path) -> int:
    """Bytes of the files under ``root``, each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def mount_points_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` (this process's mount namespace), deepest first."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            # Field 5 is the mount point, with spaces and the like escaped as octal (\040).
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a build folder, never what may be mounted inside it.

    A build killed half-way can leave the host's /dev, /proc or /sys mounted inside its root file system;
    removing files through those would remove the host's. Such mounts are detached first, and a folder
    that still has one is left in place.
    """
    if not os.path.lexists(path):
        return
    for point in mount_points_under(path):
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True, timeout=60)
    if mount_points_under(path):
        raise ImageError(f"{path} still has file systems mounted inside it: unmount them, then remove it")
    shutil.rmtree(path)


def build_rootfs(
    definition: ImageDefinition,
    target: Path,
    *,
    say: Callable[[str], None] = print,
    cancel: threading.Event | None = None,
) -> dict:
    """Build ``definition`` into ``target`` (replaced only when the build succeeds); return its manifest.

    Blocks for the build (about a minute); setting ``cancel`` from another thread stops it.
    """
    name = definition.name
    if os.geteuid() != 0:
        raise ImageError(
            f"building image {name} needs root (mmdebstrap --mode=root installs packages as root): "
            f"run `gateway image build {name}` as root"
        )
    if shutil.which("mmdebstrap") is None:
        raise ImageError("`mmdebstrap` is missing: install it (apt-get install mmdebstrap)")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        # (mkdtemp makes it 0700: apt's unprivileged _apt user, which downloads, could not enter it.)
        os.chmod(scratch, 0o755)
        out = scratch / "out"
        out.mkdir()
        rootfs = out / ROOTFS
        say(
            f"image {name}: {len(definition.packages)} packages and their dependencies from Debian "
            f"{definition.suite}, with mmdebstrap"
        )
        try:
            run_streamed(mmdebstrap_argv(definition, rootfs), say, cancel=cancel)
        except ImageError as exc:
            raise ImageError(
                f"cannot build image {name}: {exc}\nCheck the package names in its definition and that "
                f"this machine reaches the Debian mirror, then run `gateway image build {name}` again"
            ) from None
        fit_for_sandbox(rootfs)
        packages = installed_packages(rootfs)
        missing = sorted(set(definition.packages) - set(packages))
        if missing:
            raise ImageError(f"image {name}: mmdebstrap did not install {', '.join(missing)}")
        manifest: dict[str, Any] = {
            "name": name,
            "digest": definition_digest(definition),
            "description": definition.description,
            "suite": definition.suite,
            "requested": list(definition.packages),
            "packages": packages,
            "size_bytes": tree_size(rootfs),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
            "builder": BUILDER_VERSION,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        old = target.with_name(f".{target.name}.old")
        remove_tree(old)
        if target.exists():
            target.rename(old)
        out.rename(target)
        remove_tree(old)
    finally:
        remove_tree(scratch)
    say(
        f"image {name} ({manifest['digest']}) in {target}: {len(packages)} packages, "
        f"{manifest['size_bytes'] / 2**20:.0f} MiB, built in {manifest['build_seconds']:.0f} s"
    )
    return manifest


def load_manifest(folder: Path) -> dict | None:
    """The manifest of a built image folder, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None
