"""Fixtures for the edge worker tests: the exported embedding model, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.export import build_embedding_model, source_dir

# Shared 2-core machines: keep every numeric library to one thread in tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDING_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="session")
def embedding_model_dir(cache_dir: Path) -> Path:
    """The exported all-MiniLM-L6-v2 folder (built on first use, then reused across runs)."""
    return build_embedding_model(cache_dir / "edge" / EMBEDDING_MODEL)


@pytest.fixture(scope="session")
def package_model_dir() -> Path:
    """The original sentence-transformers model folder shipped in the PyPI package."""
    return source_dir()
