"""Fixtures for the edge worker tests: the exported embedding model, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.export import build_embedding_model, source_dir
from edge.lm_export import CHECKPOINT_DIR, build_small_lm

# Shared 2-core machines: keep every numeric library to one thread in tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDING_MODEL = "all-minilm-l6-v2"
SMALL_LM = "edge-small"


@pytest.fixture(scope="session")
def embedding_model_dir(cache_dir: Path) -> Path:
    """The exported all-MiniLM-L6-v2 folder (built on first use, then reused across runs)."""
    return build_embedding_model(cache_dir / "edge" / EMBEDDING_MODEL)


@pytest.fixture(scope="session")
def package_model_dir() -> Path:
    """The original sentence-transformers model folder shipped in the PyPI package."""
    return source_dir()


@pytest.fixture(scope="session")
def small_lm_dir(cache_dir: Path) -> Path:
    """The exported default small LM (generated and exported on first use, then reused across runs)."""
    return build_small_lm(cache_dir / "edge" / SMALL_LM)


@pytest.fixture(scope="session")
def torch_lm(small_lm_dir: Path):
    """transformers' own model for the same checkpoint: the oracle for greedy tokens."""
    import torch

    from edge.lm_export import load_torch_model

    torch.set_num_threads(1)
    return load_torch_model(small_lm_dir / CHECKPOINT_DIR)
