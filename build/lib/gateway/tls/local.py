"""What each machine keeps in files: the storage key (when none is configured) and the self-signed default
certificate. Blocking file work: call these through ``asyncio.to_thread``.

Both are made once, atomically (written to a temporary name, then renamed), so edge worker processes
starting together read one complete file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography.fernet import Fernet

from gateway.tls.bundle import BadCertificate, CertBundle, parse_bundle, self_signed

STORAGE_KEY_FILE = "tls/storage.key"
DEFAULT_CERT_FILE = "default.pem"
DEFAULT_KEY_FILE = "default.key"


class StorageKeyError(ValueError):
    """The configured storage key is unusable; the message says where it came from."""


def storage_key(configured: str, key_file: str, data_path: Path) -> bytes:
    """The Fernet key for private keys at rest: configured, from a file, or made in the data folder."""
    if configured:
        return _checked(configured.strip().encode("ascii"), "tls.storage_key")
    path = Path(key_file) if key_file else data_path / STORAGE_KEY_FILE
    if not key_file and not path.exists():
        _write_atomically(path, Fernet.generate_key() + b"\n", mode=0o600)
    try:
        return _checked(path.read_bytes().strip(), str(path))
    except OSError as exc:
        raise StorageKeyError(f"{path}: {exc.strerror}") from None


def _checked(key: bytes, where: str) -> bytes:
    try:
        Fernet(key)
    except ValueError:
        raise StorageKeyError(f"{where}: not a Fernet key (32 bytes, url-safe base64)") from None
    return key


def default_certificate(certs_dir: Path, names: Iterable[str]) -> CertBundle:
    """The self-signed certificate in ``certs_dir``, made (or remade, when unusable) for ``names``."""
    cert_path, key_path = certs_dir / DEFAULT_CERT_FILE, certs_dir / DEFAULT_KEY_FILE
    wanted = tuple(dict.fromkeys(n.lower() for n in names))
    try:
        bundle = parse_bundle(cert_path.read_bytes(), key_path.read_bytes())
        if set(wanted) <= set(bundle.names):
            return bundle
    except (OSError, BadCertificate):
        pass
    bundle = self_signed(wanted)
    _write_atomically(key_path, bundle.key_pem, mode=0o600)
    _write_atomically(cert_path, bundle.chain_pem, mode=0o644)
    return bundle


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
