"""What a VM with egress needs in its root, made the same way for every driver: a nameserver in
``/etc/resolv.conf`` (the host redirects the VM's port 53 to the gateway's resolver, so any address the
VM routes to the host will do) and, when the deployment has an egress CA, that CA in the VM's trust
store: appended to Debian's bundle (``/etc/ssl/certs/ca-certificates.crt``, what OpenSSL, curl, Python's
ssl and pip read) and dropped beside the local CAs (``/usr/local/share/ca-certificates``, so a later
``update-ca-certificates`` in the VM keeps it). ``CA_ENV`` points the tools that bring their own bundles
(requests, node, curl builds without the system's) at the same file.

Standard library only, and run where the root is: the netns driver calls ``install`` on the host
against the VM's writable root before its container starts (with the VM root's ids as ``owner``, so the
VM can change the files afterwards); the qemu driver runs this file in the guest through its agent
(``python3 -I -c <this file> NAMESERVER [CA_PEM]``), since the guest's root lives in its memory.

Idempotent (a resumed or restored VM runs it again): the CA is appended only when the bundle does not
hold it. Each file is written beside itself and renamed into place, so a symlink at a path is replaced,
never followed; the bundle is read without following one (a link in an image means no system bundle
here to extend: the file then holds the CA alone).
"""

from __future__ import annotations

import os
import sys

BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CA_COPY = "/usr/local/share/ca-certificates/gateway-egress-ca.crt"
RESOLV_CONF = "/etc/resolv.conf"
# Python requests (and pip's vendored copy), Python's ssl, node and curl: each told of the bundle.
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE")
FILE_MODE = 0o644
DIR_MODE = 0o755


def ca_env(ca_pem: bytes | None) -> dict[str, str]:
    """The env of every process of a VM that trusts the CA (none without one)."""
    return dict.fromkeys(CA_ENV, BUNDLE) if ca_pem else {}


def extended_bundle(bundle: bytes, ca_pem: bytes) -> bytes:
    """``bundle`` with the CA at its end, unless it holds it already (pure)."""
    ca = ca_pem.strip() + b"\n"
    if ca.strip() in bundle:
        return bundle
    if bundle and not bundle.endswith(b"\n"):
        bundle += b"\n"
    return bundle + ca


def install(root: str, nameserver: str, ca_pem: bytes | None, owner: tuple[int, int] | None = None) -> None:
    """Write the files under ``root`` (``/`` in the VM itself); ``owner``: the ids to give them."""
    _put(root, RESOLV_CONF, f"nameserver {nameserver}\n".encode(), owner)
    if ca_pem:
        _put(root, BUNDLE, extended_bundle(_read(root, BUNDLE), ca_pem), owner)
        _put(root, CA_COPY, ca_pem.strip() + b"\n", owner)


def _path(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _read(root: str, path: str) -> bytes:
    try:
        fd = os.open(_path(root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _put(root: str, path: str, data: bytes, owner: tuple[int, int] | None) -> None:
    target = _path(root, path)
    folder = os.path.dirname(target)
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for made in reversed(missing):
        os.mkdir(made, DIR_MODE)
        if owner is not None:
            os.chown(made, *owner)
    scratch = f"{target}.gateway-new"
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), FILE_MODE)
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
        os.replace(scratch, target)
    except BaseException:
        if os.path.lexists(scratch):
            os.unlink(scratch)
        raise


if __name__ == "__main__":
    install("/", sys.argv[1], sys.argv[2].encode("ascii") if len(sys.argv) > 2 else None)
