"""Server SSLContexts for the edge: Mozilla's "intermediate" profile, ALPN http/1.1, one per certificate.

``ssl`` loads a certificate and key only from files, so a bundle is written to a private temporary
folder (0700, on /dev/shm when there is one: memory, not disk), loaded, and removed at once. That is
blocking work: callers on the event loop run ``server_context`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import tempfile
from pathlib import Path

from gateway.tls.bundle import CertBundle
from gateway.tls.groups import INTERMEDIATE_GROUPS, restrict_groups

log = logging.getLogger(__name__)

# https://ssl-config.mozilla.org/ "intermediate" (TLS 1.2 part; TLS 1.3 suites are OpenSSL's defaults).
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)
_SHM = Path("/dev/shm")


def server_context(bundle: CertBundle) -> ssl.SSLContext:
    """A TLS 1.2/1.3 server context serving ``bundle`` (blocking: see the module docstring)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    if not restrict_groups(ctx):
        _warn_default_groups()
    folder = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="gateway-tls-", dir=folder) as tmp:
        chain_path, key_path = Path(tmp, "chain.pem"), Path(tmp, "key.pem")
        chain_path.write_bytes(bundle.chain_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(bundle.key_pem)
        ctx.load_cert_chain(chain_path, key_path)
    return ctx


@functools.cache
def _warn_default_groups() -> None:
    log.warning(
        "TLS: cannot restrict key-exchange groups to %s here; OpenSSL's defaults stay", INTERMEDIATE_GROUPS
    )
