"""An embedding model users bring: a sentence-transformers folder exported and checked against
sentence-transformers' own `encode`.

Tiny seeded encoders (32 hidden units) stand in for a user's, saved by sentence-transformers itself:
BERT and DistilBERT with all-MiniLM-L6-v2's tokenizer, mean or CLS pooling, normalised or not;
RoBERTa, XLM-RoBERTa and MPNet with tokenizers of their own kind (byte-level BPE, unigram, WordPiece)
trained here, whose pad token is 1 and whose position table has rows positions never reach;
ModernBERT (byte-level BPE) with a sliding window far shorter than the long text.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.export import ExportError, build_embedding_model, main
from edge.lm_checkpoint import CORPUS
from edge.runtime.embedding import EmbeddingModel

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import models as st_models  # noqa: E402

TEXTS = ["Hello world.", "Zürich, 東京 and 🙂", "", " ".join(["A long sentence past the limit."] * 30), "a"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def write_sentence_transformer(dest: Path, package_model_dir: Path, pooling: str, normalize: bool,
                               dense: int | None = None) -> Path:
    """A seeded random BERT saved as a sentence-transformers model folder (with a Dense layer of
    `dense` outputs after the pooling, if asked)."""
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
    if dense:
        modules.append(st_models.Dense(32, dense, activation_function=torch.nn.Tanh()))
    st.SentenceTransformer(modules=modules + ([st_models.Normalize()] if normalize else []), device="cpu").save(str(dest))
    return dest


def write_tokenizer(dest: Path, family: str) -> None:
    """A small trained tokenizer of the kind `family` ships, saved as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's order: pad is 1
    if family == "roberta":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif family == "xlm-roberta":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False)
    else:  # mpnet: WordPiece, BERT's pre-tokenizer, RoBERTa's special tokens
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", model_max_length=MAX_POSITIONS - 2, model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(dest)


MAX_POSITIONS = 40  # rows of the position table; RoBERTa-style positions start at 2, so 38 tokens fit


def write_family_transformer(dest: Path, family: str, package_model_dir: Path) -> Path:
    """A seeded random `family` encoder with its own kind of tokenizer, as a sentence-transformers folder."""
    import torch
    from transformers import AutoConfig, AutoModel

    encoder = dest.parent / f"{dest.name}-encoder"
    if family == "distilbert":  # BERT's tokenizer, [PAD] = 0; its config spells the sizes its own way
        encoder.mkdir()
        for name in TOKENIZER_FILES:
            shutil.copy(package_model_dir / name, encoder / name)
        sizes = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, pad_token_id=0)
    else:
        write_tokenizer(encoder, "roberta" if family == "modernbert" else family)
        sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2)
        if family == "modernbert":  # a global layer, then one that sees 4 tokens either side
            sizes |= dict(cls_token_id=0, sep_token_id=2, global_attn_every_n_layers=2, local_attention=8)
    vocab = len(json.loads((encoder / "tokenizer.json").read_text())["model"]["vocab"])
    config = AutoConfig.for_model(family, vocab_size=vocab, max_position_embeddings=MAX_POSITIONS, **sizes)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(encoder)
    modules = [st_models.Transformer(str(encoder)), st_models.Pooling(32, pooling_mode="mean"), st_models.Normalize()]
    prompts = {"prompts": {"query": PROMPT, "document": ""}, "default_prompt_name": "query"} if family in PROMPTED else {}
    st.SentenceTransformer(modules=modules, device="cpu", **prompts).save(str(dest))
    if family in LOWERCASED:  # as sentence-transformers before 6 wrote it
        config = json.loads((dest / "sentence_bert_config.json").read_text())
        (dest / "sentence_bert_config.json").write_text(json.dumps(config | {"do_lower_case": True}))
    return dest


PROMPT = "query: "  # E5's convention; encode puts it before every text when it is the default
PROMPTED = ("xlm-roberta",)
LOWERCASED = ("roberta",)  # a cased byte-level BPE: lowercasing changes its tokens


# family -> (pad token, positions an input may fill)
FAMILY_CASES = {"roberta": ((1, "<pad>"), MAX_POSITIONS - 2), "xlm-roberta": ((1, "<pad>"), MAX_POSITIONS - 2),
                "mpnet": ((1, "<pad>"), MAX_POSITIONS - 2), "distilbert": ((0, "[PAD]"), MAX_POSITIONS),
                # Rotary positions skip no rows; the RoBERTa-style tokenizer's model_max_length bounds it.
                "modernbert": ((1, "<pad>"), MAX_POSITIONS - 2)}


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_each_encoder_family_embeds_as_sentence_transformers_does(
    tmp_path: Path, package_model_dir: Path, family: str
) -> None:
    (pad_id, pad_token), positions = FAMILY_CASES[family]
    source = write_family_transformer(tmp_path / family, family, package_model_dir)
    export = build_embedding_model(tmp_path / "export", source=source)
    meta = json.loads((export / "meta.json").read_text())
    assert (meta["family"], meta["inputs"], meta["hidden_size"]) == (family, ["input_ids", "attention_mask"], 32)
    assert meta["padding"] == {"pad_id": pad_id, "pad_token": pad_token}
    assert meta["max_seq_length"] == positions
    assert meta["int8"]["fp32_matmuls"] == 2 * 2  # both feed-forward MatMuls of both layers stay fp32
    assert meta["prompt"] == (PROMPT if family in PROMPTED else "")
    assert meta["lowercase"] == (family in LOWERCASED)
    model = EmbeddingModel.load(export)
    ours = model.embed(TEXTS)
    expected = st.SentenceTransformer(str(source), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours.vectors, expected, atol=2e-5)
    assert ours.token_counts[3] == positions  # the long text fills every position there is
    assert float(ours.vectors[0] @ ours.vectors[1]) < 0.99  # different texts, different vectors
    padded = model.tokenizer.encode_batch(["a", "a longer sentence"])[0]
    assert padded.ids[-1] == pad_id and padded.attention_mask[-1] == 0  # batches pad with the family's pad


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


@pytest.mark.parametrize("normalize", [True, False])
def test_a_dense_layer_after_the_pooling_projects_as_its_library_does(
    tmp_path: Path, package_model_dir: Path, normalize: bool
) -> None:
    """LaBSE and distiluse end in a Dense layer (tanh) after their pooling."""
    source = write_sentence_transformer(tmp_path / "dense", package_model_dir, "cls", normalize, dense=12)
    export = build_embedding_model(tmp_path / "export", source=source)
    meta = json.loads((export / "meta.json").read_text())
    assert meta["dimension"] == 12 and meta["dense"]["activation"] == "tanh" and (export / "dense.npz").is_file()
    ours = EmbeddingModel.load(export).embed(TEXTS)
    expected = st.SentenceTransformer(str(source), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert ours.vectors.shape == (len(TEXTS), 12)
    np.testing.assert_allclose(ours.vectors, expected, atol=2e-5)
    assert normalize or np.abs(ours.vectors).max() < 1  # tanh's range, as the layer's own output


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("max-pooling", "pooling max is not supported; supported: mean, cls"),
        ("electra", "model_type 'electra' is not supported; supported: bert, roberta, xlm-roberta, mpnet, distilbert, modernbert"),
        ("two-dense-modules", "are not supported; supported: Transformer, Pooling[, Dense][, Normalize]"),
        ("no-tokenizer", "tokenizer.json is missing"),
        ("prompt-left-out", "a default prompt left out of the pooling (include_prompt: false) is not supported"),
        ("gelu-dense", "Dense activation torch.nn.modules.activation.GELU is not supported; supported: Tanh, Identity, ReLU"),
    ],
)
def test_a_folder_the_export_cannot_take_is_refused_before_any_work(
    tmp_path: Path, package_model_dir: Path, capsys, change: str, fragment: str
) -> None:
    source = write_sentence_transformer(tmp_path / "src", package_model_dir, "mean", True)
    if change == "max-pooling":
        legacy = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
        (source / "1_Pooling" / "config.json").write_text(json.dumps(legacy))  # the spelling of older releases
    elif change == "electra":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(config | {"model_type": "electra"}))
    elif change == "two-dense-modules":
        modules = json.loads((source / "modules.json").read_text())
        for idx in (2, 3):
            modules.insert(idx, {"idx": idx, "name": str(idx), "path": f"{idx}_Dense",
                                 "type": "sentence_transformers.models.Dense"})
        (source / "modules.json").write_text(json.dumps(modules))
    elif change == "gelu-dense":
        source = write_sentence_transformer(tmp_path / "src-dense", package_model_dir, "mean", True, dense=8)
        config = json.loads((source / "2_Dense" / "config.json").read_text())
        (source / "2_Dense" / "config.json").write_text(
            json.dumps(config | {"activation_function": "torch.nn.modules.activation.GELU"}))
    elif change == "prompt-left-out":
        (source / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": {"query": PROMPT}, "default_prompt_name": "query"}))
        pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
        (source / "1_Pooling" / "config.json").write_text(json.dumps(pooling | {"include_prompt": False}))
    else:
        (source / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=re.escape(fragment)):
        build_embedding_model(tmp_path / "export", source=source)
    assert main([str(tmp_path / "export"), "--source", str(source)]) == 1
    assert fragment.split(";")[0] in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
