"""A digest of the sources an image of ours packages, so that a test can tell an image built from
this tree from a stale one (`deploy/docker/build_image.sh` labels each image with it)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "edge", "core", "kernels", "deploy", "mobile")
SUFFIXES = (".py", ".proto", ".yaml", ".json", ".pbtxt")
LABEL = "org.meridian.source"


def digest(root: Path = ROOT) -> str:
    """sha256 over the packages' source files (as the wheel takes them) and pyproject.toml."""
    files = sorted(f for pkg in PACKAGES for f in (root / pkg).rglob("*")
                   if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts)
    h = hashlib.sha256()
    for f in [root / "pyproject.toml", *files]:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


if __name__ == "__main__":
    sys.stdout.write(digest() + "\n")
