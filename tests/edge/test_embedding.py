"""The ONNX embedding loop against sentence-transformers' own encoder, and the export's bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.export import build_embedding_model, fingerprint, source_dir
from edge.runtime.embedding import EmbeddingModel, length_groups

LONG = " ".join(
    f"Sentence {i} of a long document that runs well past the model's maximum sequence length."
    for i in range(60)
)
CASES = {
    "short": ["Hello world."],
    "sentence": ["The edge worker answers small requests close to the user."],
    "long_past_256_tokens": [LONG],
    "unicode": ["Zürich, 東京, Σωκράτης, مرحبا and emoji 🙂👍🏽 — “quotes” and ﬁ ligatures."],
    "whitespace_and_empty": ["  padded with spaces\tand\ttabs\n", ""],
    "mixed_batch": [
        "a",
        "A medium sentence about caching embeddings at the edge.",
        LONG,
        "Ünïcödé straße",
        "Numbers 12345 and symbols #@$%^&*()",
        "short",
    ],
}


@pytest.fixture(scope="module")
def model(embedding_model_dir: Path) -> EmbeddingModel:
    """Our runtime, one thread."""
    return EmbeddingModel.load(embedding_model_dir, threads=1)


@pytest.fixture(scope="module")
def reference(package_model_dir: Path):
    """sentence-transformers' own encoder for the same checkpoint, on CPU with one thread."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    return SentenceTransformer(str(package_model_dir), device="cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_sentence_transformers(model: EmbeddingModel, reference, case: str) -> None:
    texts = CASES[case]
    ours = model.embed(texts).vectors
    theirs = reference.encode(texts, convert_to_numpy=True, normalize_embeddings=False, batch_size=len(texts))
    cosine = (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cosine.min() >= 0.999, cosine
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_shape_dtype_and_unit_norm(model: EmbeddingModel) -> None:
    result = model.embed(CASES["mixed_batch"])
    assert result.vectors.shape == (len(CASES["mixed_batch"]), 384)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


def test_prompt_tokens_count_real_tokens_after_truncation(model: EmbeddingModel) -> None:
    assert model.embed(["hello world"]).prompt_tokens == 4  # [CLS] hello world [SEP]
    assert model.embed([LONG]).prompt_tokens == 256  # truncated at max_seq_length
    assert model.embed(["hello world", LONG]).prompt_tokens == 260  # padding is not counted


def test_batching_and_order_do_not_change_vectors(model: EmbeddingModel) -> None:
    texts = CASES["mixed_batch"]
    batch = model.embed(texts).vectors
    alone = np.stack([model.embed([t]).vectors[0] for t in texts])
    reversed_batch = model.embed(texts[::-1]).vectors[::-1]
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    np.testing.assert_allclose(batch, reversed_batch, atol=1e-5)


def test_instances_run_side_by_side_with_the_same_vectors(
    embedding_model_dir: Path, model: EmbeddingModel
) -> None:
    """One session per instance; calls from more threads than instances wait for a free one, each
    instance takes its share, and every call gets the vectors a single session gives."""
    from concurrent.futures import ThreadPoolExecutor

    loaded = EmbeddingModel.load(embedding_model_dir, threads=1, instances=2)
    assert len(loaded.sessions) == 2 and loaded.sessions[0] is not loaded.sessions[1]
    recorders = [_RecordingSession(session) for session in loaded.sessions]
    pooled = EmbeddingModel(recorders, loaded.tokenizer, loaded.meta)
    texts = CASES["sentence"] + CASES["unicode"]
    expected = model.embed(texts).vectors
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: pooled.embed(texts).vectors, range(16)))
    for vectors in results:
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert all(r.shapes for r in recorders)  # both instances ran
    assert sum(len(r.shapes) for r in recorders) >= 16  # a call is one or more runs
    assert pooled._free.qsize() == 2  # every session went back to the pool


def test_empty_batch(model: EmbeddingModel) -> None:
    result = model.embed([])
    assert result.vectors.shape == (0, 384) and result.prompt_tokens == 0


def test_meta_describes_the_export(embedding_model_dir: Path) -> None:
    meta = json.loads((embedding_model_dir / "meta.json").read_text())
    assert meta["dimension"] == 384
    assert meta["max_seq_length"] == 256
    assert meta["pooling"] == "mean" and meta["normalize"] is True
    assert meta["fingerprint"] == fingerprint(source_dir())
    assert {p.name for p in embedding_model_dir.iterdir()} >= {"model.onnx", "tokenizer.json", "meta.json"}


def test_onnx_axes_are_dynamic(model: EmbeddingModel) -> None:
    inputs = {i.name: i.shape for i in model.session.get_inputs()}
    assert inputs == {
        name: ["batch", "sequence"] for name in ("input_ids", "attention_mask", "token_type_ids")
    }


def test_rebuild_is_skipped_when_up_to_date(embedding_model_dir: Path, capsys) -> None:
    before = (embedding_model_dir / "model.onnx").stat().st_mtime_ns
    assert build_embedding_model(embedding_model_dir) == embedding_model_dir
    assert (embedding_model_dir / "model.onnx").stat().st_mtime_ns == before
    assert "up to date" in capsys.readouterr().err


def test_export_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_embedding_model(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        EmbeddingModel.load(tmp_path)


class _RecordingSession:
    """Passes calls through to a real session, recording the shape of each batch it runs."""

    def __init__(self, session) -> None:
        self.session = session
        self.shapes: list[tuple[int, int]] = []

    def run(self, outputs, feeds):
        self.shapes.append(feeds["input_ids"].shape)
        return self.session.run(outputs, feeds)

    def get_inputs(self):
        return self.session.get_inputs()


def test_a_long_input_does_not_pad_the_short_ones_of_its_batch(embedding_model_dir: Path) -> None:
    model = EmbeddingModel.load(embedding_model_dir, threads=1)
    short = [f"Short sentence number {i}." for i in range(7)]
    alone = model.embed(short).vectors
    recording = _RecordingSession(model.session)
    model = EmbeddingModel([recording], model.tokenizer, model.meta)
    result = model.embed([short[0], LONG, *short[1:]])
    widths = {len(model.tokenizer.encode(t).ids) for t in short}
    # Two calls: the seven short ones at their own width, the long one alone at 256 tokens.
    assert sorted(recording.shapes) == [(1, 256), (7, max(widths))]
    np.testing.assert_allclose(np.delete(result.vectors, 1, axis=0), alone, atol=1e-5)
    assert result.token_counts[1] == 256


def test_similar_lengths_stay_one_call(embedding_model_dir: Path) -> None:
    model = EmbeddingModel.load(embedding_model_dir, threads=1)
    recording = _RecordingSession(model.session)
    model = EmbeddingModel([recording], model.tokenizer, model.meta)
    model.embed([f"Sentence {i}: the edge worker answers {'small ' * (i % 3)}requests." for i in range(32)])
    assert len(recording.shapes) == 1


def test_length_groups_cover_every_row_once_and_cut_only_when_it_pays() -> None:
    lengths = np.array([22] * 31 + [256])
    groups = length_groups(lengths)
    assert [sorted(g.tolist()) for g in groups] == [list(range(31)), [31]]
    mixed = np.random.default_rng(0).integers(3, 257, 200)
    rows = np.concatenate(length_groups(mixed))
    assert sorted(rows.tolist()) == list(range(200))
    assert len(length_groups(np.array([21, 22, 23] * 10))) == 1  # 4% padding: not worth a second call
    assert [g.tolist() for g in length_groups(np.array([9]))] == [[0]]


def test_sessions_do_not_spin_between_ops(model: EmbeddingModel) -> None:
    # Spinning pool threads would take the cores the event loop and other work on the box need.
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
