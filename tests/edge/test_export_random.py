"""Random-weight builds of the embedding model (for benches on machines without its package): the
same graph as the real export, verified the same way, and labelled so that nobody takes its vectors
for embeddings."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

import edge.export as export
from edge.runtime.embedding import EmbeddingModel


def _graph(path: Path) -> tuple[collections.Counter, list]:
    """Op types and initializer shapes of an ONNX file: its structure, not its values."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return (collections.Counter(n.op_type for n in graph.node),
            sorted((tuple(t.dims), t.data_type) for t in graph.initializer))


@pytest.fixture(scope="module")
def architecture(tmp_path_factory) -> Path:
    """The architecture files, written through the CLI as the bench instructions do."""
    dest = tmp_path_factory.mktemp("arch")
    assert export.main([str(dest), "--architecture-only"]) == 0
    return dest


@pytest.fixture(scope="module")
def random_dir(architecture: Path, tmp_path_factory) -> Path:
    return export.build_random_embedding_model(tmp_path_factory.mktemp("random") / "m", architecture, seed=3)


def test_architecture_only_carries_no_weights(architecture: Path) -> None:
    files = {p.relative_to(architecture).as_posix() for p in architecture.rglob("*") if p.is_file()}
    assert files == set(export.ARCHITECTURE_FILES)
    assert sum(p.stat().st_size for p in architecture.rglob("*") if p.is_file()) < 1_000_000


def test_random_build_has_the_real_graph_and_tokenizer(random_dir: Path, embedding_model_dir: Path) -> None:
    assert _graph(random_dir / "model.onnx") == _graph(embedding_model_dir / "model.onnx")
    real, fake = EmbeddingModel.load(embedding_model_dir), EmbeddingModel.load(random_dir)
    texts = ["Hello world.", "Zürich, 東京 and emoji 🙂", "a " * 400]
    assert real.embed(texts).token_counts == fake.embed(texts).token_counts
    assert fake.embed(texts).vectors.shape == (3, 384)


def test_random_build_says_so_and_has_no_int8(random_dir: Path) -> None:
    meta = json.loads((random_dir / "meta.json").read_text())
    assert "random weights (seed 3)" in meta["weights"]
    assert "package" not in meta["source"] and "int8" not in meta
    assert not (random_dir / "model.int8.onnx").exists()


def test_random_build_vectors_are_not_the_real_embeddings(random_dir: Path, embedding_model_dir: Path) -> None:
    texts = ["The edge worker answers small requests close to the user."]
    real = EmbeddingModel.load(embedding_model_dir).embed(texts).vectors
    fake = EmbeddingModel.load(random_dir).embed(texts).vectors
    assert float((real * fake).sum()) < 0.9


def test_an_export_that_does_not_match_pytorch_is_refused(architecture: Path, tmp_path: Path, monkeypatch) -> None:
    exported = export._export_onnx

    def drifting_export(model, path: Path) -> None:
        """Export a model with one weight off, then put it back: the ONNX no longer matches PyTorch."""
        import torch

        weight = dict(model.named_parameters())["encoder.layer.0.intermediate.dense.weight"]
        noise = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            weight.add_(noise)
            exported(model, path)
            weight.sub_(noise)

    monkeypatch.setattr(export, "_export_onnx", drifting_export)
    with pytest.raises(export.ExportError, match="does not match PyTorch"):
        export.build_random_embedding_model(tmp_path / "m", architecture)
    assert not (tmp_path / "m").exists()


def test_random_fingerprint_follows_the_seed(architecture: Path) -> None:
    assert export.random_fingerprint(architecture, 0) != export.random_fingerprint(architecture, 1)
    assert export.random_fingerprint(architecture, 0) == export.random_fingerprint(architecture, 0)
