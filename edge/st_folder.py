"""What a sentence-transformers model folder says about turning its encoder's token states into
sentence embeddings: the module pipeline, the pooling, a Dense layer after it, the default prompt,
the pad token, lowercasing and the length limit; and `check`, which refuses before any work a folder
the embedding export (`edge.export`) cannot take, saying why. JSON reading (safetensors for the
Dense weights); no torch unless a Dense layer was saved as pytorch_model.bin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.encoder_families import UnsupportedEncoder, family_of, hidden_size, max_positions
from edge.runtime.embedding import DENSE_FILE
from edge.runtime.model_dir import TOKENIZER_FILE


class UnsupportedFolder(ValueError):
    """A folder the embedding export cannot take; the message says why."""


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# What defines the model except its weights: enough to build it with random weights elsewhere.
ARCHITECTURE_FILES = ("config.json", TOKENIZER_FILE, "sentence_bert_config.json", "modules.json",
                      "1_Pooling/config.json")
# Read when present: the pad token and length limit, and the prompt put before every text.
OPTIONAL_FILES = ("tokenizer_config.json", "config_sentence_transformers.json")
# The pipelines of sentence-transformers modules the export takes (by module class name).
PIPELINES = (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"],
             ["Transformer", "Pooling", "Dense"], ["Transformer", "Pooling", "Dense", "Normalize"])
# A Dense module's activation (its config's class path) -> the runtime's name for it.
DENSE_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "tanh", "torch.nn.modules.linear.Identity": "identity",
                     "torch.nn.modules.activation.ReLU": "relu"}


def check(src: Path) -> None:
    """Refuse, before any work, a sentence-transformers folder this export cannot take, saying why."""
    if not src.is_dir():
        raise UnsupportedFolder(f"{src} is not a folder")
    for name in ARCHITECTURE_FILES:
        if not (src / name).is_file():
            raise UnsupportedFolder(f"{src / name} is missing: expected a sentence-transformers model folder "
                              f"(SentenceTransformer.save writes one), with a fast tokenizer")
    try:
        family_of(json.loads((src / "config.json").read_text()).get("model_type"))
    except UnsupportedEncoder as exc:
        raise UnsupportedFolder(f"{src}: {exc}") from None
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((src / "modules.json").read_text())]
    if modules not in PIPELINES:
        raise UnsupportedFolder(f"{src}: modules {modules} are not supported; supported: Transformer, Pooling[, Dense][, Normalize]")
    _, pooled = pooling(src)
    dense = dense_config(src)
    if dense and int(dense["in_features"]) != pooled:
        raise UnsupportedFolder(f"{src}: the Dense module takes {dense['in_features']} features, the pooling gives {pooled}")
    pooling_config = json.loads((src / "1_Pooling" / "config.json").read_text())
    if default_prompt(src) and pooling_config.get("include_prompt") is False:
        raise UnsupportedFolder(f"{src}: a default prompt left out of the pooling (include_prompt: false) is not supported")


def describe(src: Path) -> dict:
    """What the runtime needs from the folder `src` (checked by `check`) to turn token states into
    sentence embeddings: the fields of an export's meta.json that the folder decides."""
    model_config = json.loads((src / "config.json").read_text())
    st_config = json.loads((src / "sentence_bert_config.json").read_text())
    mode, dimension = pooling(src)
    modules = json.loads((src / "modules.json").read_text())
    dense = dense_config(src)
    return {
        "dimension": int(dense["out_features"]) if dense else dimension,
        "max_seq_length": max_seq_length(src, st_config, model_config),
        "pooling": mode,
        "normalize": any(m["type"].endswith(".Normalize") for m in modules),
        "inputs": list(family_of(model_config.get("model_type")).inputs),
        "padding": padding(src, model_config),
        "prompt": default_prompt(src),
        # sentence-transformers before 6 wrote this flag; 6 bakes it into tokenizer.json instead
        "lowercase": bool(st_config.get("do_lower_case", False)),
        "dense": None if dense is None else {"file": DENSE_FILE, "activation": dense["activation"],
                                             "in_features": dimension, "out_features": int(dense["out_features"])},
        "family": model_config["model_type"],
        "hidden_size": hidden_size(model_config),
    }


def dense_dir(src: Path) -> Path | None:
    """The folder of the Dense module after the pooling, if the pipeline has one."""
    path = src / "modules.json"
    modules = json.loads(path.read_text()) if path.is_file() else []
    return next((src / m["path"] for m in modules if m["type"].endswith(".Dense")), None)


def dense_config(src: Path) -> dict | None:
    """The Dense module's config, checked: an activation the runtime applies, weights present."""
    folder = dense_dir(src)
    if folder is None:
        return None
    config = json.loads((folder / "config.json").read_text())
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in DENSE_ACTIVATIONS:
        supported = ", ".join(a.rsplit(".", 1)[-1] for a in DENSE_ACTIVATIONS)
        raise UnsupportedFolder(f"{folder}: Dense activation {activation} is not supported; supported: {supported}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UnsupportedFolder(f"{folder}: the Dense module has no weights ({' or '.join(WEIGHT_FILES)})")
    return config | {"activation": DENSE_ACTIVATIONS[activation]}


def write_dense(src: Path, out: Path) -> None:
    """The Dense module's weights as DENSE_FILE (the runtime applies them in numpy after pooling)."""
    folder = dense_dir(src)
    if (folder / WEIGHT_FILES[0]).is_file():
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / WEIGHT_FILES[0]))
    else:
        import torch

        tensors = {k: v.float().numpy() for k, v in torch.load(folder / WEIGHT_FILES[1], map_location="cpu").items()}
    arrays = {"weight": tensors["linear.weight"].astype(np.float32)}
    if "linear.bias" in tensors:
        arrays["bias"] = tensors["linear.bias"].astype(np.float32)
    np.savez(out / DENSE_FILE, **arrays)


def pooling(src: Path) -> tuple[str, int]:
    """The pooling of `src`, "mean" or "cls" (sentence-transformers' other modes are refused), and
    the dimension it yields. Both spellings of 1_Pooling/config.json: sentence-transformers 6 writes
    `pooling_mode: "cls"` and `embedding_dimension`, earlier ones a flag per mode and
    `word_embedding_dimension`."""
    config = json.loads((src / "1_Pooling" / "config.json").read_text())
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    else:
        modes = sorted(k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
                       for k, on in config.items() if k.startswith("pooling_mode_") and on)
    if modes not in (["mean"], ["cls"]):
        raise UnsupportedFolder(f"{src}: pooling {'+'.join(modes) or 'none'} is not supported; supported: mean, cls")
    return modes[0], int(config.get("embedding_dimension") or config["word_embedding_dimension"])


def max_seq_length(src: Path, st_config: dict, model_config: dict) -> int:
    """Where sentence-transformers truncates: sentence_bert_config.json's `max_seq_length` (releases
    before 6), else the tokenizer's `model_max_length` (6 writes it there), else the position table;
    never past what the position table holds."""
    positions = max_positions(model_config)
    if st_config.get("max_seq_length"):
        return min(int(st_config["max_seq_length"]), positions)
    limit = tokenizer_config(src).get("model_max_length")
    if isinstance(limit, int) and limit < 1_000_000:  # transformers writes a huge number for "none"
        return min(limit, positions)
    return positions


def default_prompt(src: Path) -> str:
    """What sentence-transformers' `encode` puts before every text unless told otherwise: the prompt
    config_sentence_transformers.json names as `default_prompt_name`, or nothing."""
    path = src / "config_sentence_transformers.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    name = config.get("default_prompt_name")
    return str((config.get("prompts") or {}).get(name, "")) if name else ""


def tokenizer_config(src: Path) -> dict:
    """tokenizer_config.json of `src`, or nothing when the folder has none."""
    path = src / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def padding(src: Path, model_config: dict) -> dict:
    """The pad token batches are padded with: tokenizer.json's own padding, else tokenizer_config's
    pad token, else the model config's pad_token_id (BERT's [PAD] is 0, RoBERTa's <pad> 1)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(src / TOKENIZER_FILE))
    if tokenizer.padding:
        return {"pad_id": int(tokenizer.padding["pad_id"]), "pad_token": str(tokenizer.padding["pad_token"])}
    token = tokenizer_config(src).get("pad_token")
    token = token.get("content") if isinstance(token, dict) else token  # older files spell it out
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return {"pad_id": tokenizer.token_to_id(token), "pad_token": token}
    pad_id = int(model_config.get("pad_token_id") or 0)
    return {"pad_id": pad_id, "pad_token": tokenizer.id_to_token(pad_id) or ""}
