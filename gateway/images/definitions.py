"""Image definitions: what an image is made of, and the digest that says when it must be rebuilt (pure)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

DIGEST_HEX_CHARS = 16


@dataclass(frozen=True)
class ImageDefinition:
    name: str
    description: str
    # Debian packages installed on top of the minbase variant (Essential and apt), with their dependencies.
    packages: tuple[str, ...]
    suite: str = "bookworm"


def definition_digest(definition: ImageDefinition) -> str:
    """What the image's files depend on: its packages, its suite and the builder's version.

    The name and description are left out (renaming or re-describing an image rebuilds nothing), and so
    is the order of the packages (mmdebstrap installs a set).
    """
    # Here rather than at the top: the builder imports this module.
    from gateway.images.builder import BUILDER_VERSION

    content = {
        "packages": sorted(set(definition.packages)),
        "suite": definition.suite,
        "builder": BUILDER_VERSION,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:DIGEST_HEX_CHARS]
