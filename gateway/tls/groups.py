"""Key-exchange groups of the TLS listener: Mozilla's "intermediate" list, X25519, P-256 and P-384.

OpenSSL's default list also offers P-521, X448 and the finite-field groups, which the profile leaves
out (slow, and nobody needs them). Python's ``ssl`` has no call for the list (3.11's ``set_ecdh_curve``
sets one curve, and only for TLS 1.2), so this calls OpenSSL's own ``SSL_CTX_set1_groups_list`` on the
context's ``SSL_CTX`` through ctypes:

- the ``SSL_CTX *`` is the first field after the object header of CPython's ``PySSLContext``
  (Modules/_ssl.c), stable since Python 3.x began;
- the library is the libssl that ``_ssl`` itself loaded (found in this process's memory map), so the
  pointer and the functions belong to the same OpenSSL;
- before anything is written, the pointer is checked: OpenSSL's ``SSL_CTX_get_options`` must read back
  the very options Python reports for the context. If anything does not match (another Python, a
  statically linked OpenSSL), nothing is changed and the caller logs that the default groups stay.
"""

from __future__ import annotations

import ctypes
import functools
import re
import ssl
from pathlib import Path

INTERMEDIATE_GROUPS = "X25519:P-256:P-384"
# SSL_CTX_set1_groups_list(ctx, list) is a macro: SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, list).
SSL_CTRL_SET_GROUPS_LIST = 92


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    """The libssl this process's ``_ssl`` module uses, or None when it cannot be told."""
    import _ssl  # noqa: F401 - loaded so that its libssl is in the memory map

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = set(re.findall(r"(/\S*/libssl\.so[.\d]*)$", maps, re.MULTILINE))
    if len(paths) != 1:
        return None
    lib = ctypes.CDLL(paths.pop())
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    return lib


def restrict_groups(ctx: ssl.SSLContext, groups: str = INTERMEDIATE_GROUPS) -> bool:
    """Offer only ``groups`` (OpenSSL names, colon-separated); False when it could not be done."""
    lib = _libssl()
    if lib is None or ssl.OPENSSL_VERSION_INFO < (3, 0):
        return False
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != ctx.options:
        return False
    return lib.SSL_CTX_ctrl(pointer, SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(groups.encode())) == 1
