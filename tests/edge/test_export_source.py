"""An embedding model users bring: a sentence-transformers folder exported and checked against
sentence-transformers' own `encode`.

Tiny seeded BERT encoders (all-MiniLM-L6-v2's tokenizer, 32 hidden units) stand in for a user's,
saved by sentence-transformers itself, with mean or CLS pooling, normalised or not.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.export import ExportError, build_embedding_model, main
from edge.runtime.embedding import EmbeddingModel

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import models as st_models  # noqa: E402

TEXTS = ["Hello world.", "Zürich, 東京 and 🙂", "", " ".join(["A long sentence past the limit."] * 30), "a"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def write_sentence_transformer(dest: Path, package_model_dir: Path, pooling: str, normalize: bool) -> Path:
    """A seeded random BERT saved as a sentence-transformers model folder."""
    import torch
    from transformers import BertConfig, BertModel

    encoder = dest.parent / f"{dest.name}-bert"
    vocab = json.loads((package_model_dir / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(encoder)
    for name in TOKENIZER_FILES:
        if (package_model_dir / name).is_file():
            shutil.copy(package_model_dir / name, encoder / name)
    modules = [st_models.Transformer(str(encoder), max_seq_length=48), st_models.Pooling(32, pooling_mode=pooling)]
    st.SentenceTransformer(modules=modules + ([st_models.Normalize()] if normalize else []), device="cpu").save(str(dest))
    return dest


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", True), ("mean", False)])
def test_a_sentence_transformers_folder_embeds_as_its_library_does(
    tmp_path: Path, package_model_dir: Path, pooling: str, normalize: bool
) -> None:
    source = write_sentence_transformer(tmp_path / "my-encoder", package_model_dir, pooling, normalize)
    export = build_embedding_model(tmp_path / "export", source=source)
    meta = json.loads((export / "meta.json").read_text())
    assert (meta["name"], meta["pooling"], meta["normalize"], meta["dimension"]) == ("my-encoder", pooling, normalize, 32)
    assert meta["int8"]["kept"] == (export / "model.int8.onnx").is_file()
    ours = EmbeddingModel.load(export).embed(TEXTS)
    expected = st.SentenceTransformer(str(source), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours.vectors, expected, atol=2e-5)
    assert ours.token_counts[3] == 48  # truncated at the folder's max_seq_length


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("max-pooling", "pooling max is not supported; supported: mean, cls"),
        ("roberta", "model_type 'roberta' is not supported"),
        ("dense-module", "are not supported; supported: Transformer, Pooling[, Normalize]"),
        ("no-tokenizer", "tokenizer.json is missing"),
    ],
)
def test_a_folder_the_export_cannot_take_is_refused_before_any_work(
    tmp_path: Path, package_model_dir: Path, capsys, change: str, fragment: str
) -> None:
    source = write_sentence_transformer(tmp_path / "src", package_model_dir, "mean", True)
    if change == "max-pooling":
        legacy = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
        (source / "1_Pooling" / "config.json").write_text(json.dumps(legacy))  # the spelling of older releases
    elif change == "roberta":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(config | {"model_type": "roberta"}))
    elif change == "dense-module":
        modules = json.loads((source / "modules.json").read_text())
        modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (source / "modules.json").write_text(json.dumps(modules))
    else:
        (source / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=re.escape(fragment)):
        build_embedding_model(tmp_path / "export", source=source)
    assert main([str(tmp_path / "export"), "--source", str(source)]) == 1
    assert fragment.split(";")[0] in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
