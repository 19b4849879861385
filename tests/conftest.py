"""Session-wide fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where `make models` puts heavy artefacts (ONNX exports, generated checkpoints)."""
    root = Path(os.environ.get("MERIDIAN_CACHE", Path.home() / ".cache" / "meridian"))
    root.mkdir(parents=True, exist_ok=True)
    return root
