"""Fixtures for the core: the local default checkpoint, built once into the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.checkpoint.synthetic import MODEL_NAME, build_local_checkpoint

torch.set_num_threads(2)  # the machines are shared


@pytest.fixture(scope="session")
def local_checkpoint(cache_dir: Path) -> Path:
    """`<cache>/core/meridian-moe-mini`, built when missing."""
    return build_local_checkpoint(cache_dir / "core" / MODEL_NAME)
