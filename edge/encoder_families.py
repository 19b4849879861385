"""The text encoder families the embedding export takes, and what sets each apart.

All of them run as embeddings, then encoder layers under additive attention masks, which is what
`edge.export` traces. Families and the embedding models they carry: bert (all-MiniLM, BGE, GTE, E5),
roberta and xlm-roberta (multilingual E5, BGE-M3), mpnet (all-mpnet-base-v2), distilbert
(multi-qa-distilbert, msmarco-distilbert), modernbert (gte-modernbert, modernbert-embed: rotary
positions, and a sliding attention window on all but every n-th layer). Plain data, no torch:
the export's checks of a folder run before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What sets an encoder family apart for the export and the runtime."""

    inputs: tuple[str, ...]  # the graph's inputs, in order
    # RoBERTa-style position ids count from padding_idx + 1, so that many rows of the position
    # table are never used; None where positions start at 0 (BERT).
    padding_idx: str | int | None = None  # a config attribute naming it, or the family's constant
    encoder: str = "encoder"  # the model's attribute holding its layers
    # The layers alternate global attention with a window of `config.sliding_window` tokens either
    # side (ModernBERT): the export hands the model a mask of each kind instead of one mask.
    sliding_window: bool = False


BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# RoBERTa's tokenizers give no token types: its single type embedding is added for every token.
ROBERTA_INPUTS = ("input_ids", "attention_mask")
FAMILIES = {
    "bert": Family(BERT_INPUTS),
    "roberta": Family(ROBERTA_INPUTS, padding_idx="pad_token_id"),
    "xlm-roberta": Family(ROBERTA_INPUTS, padding_idx="pad_token_id"),
    "mpnet": Family(ROBERTA_INPUTS, padding_idx=1),  # MPNetEmbeddings fixes it at 1
    "distilbert": Family(ROBERTA_INPUTS, encoder="transformer"),  # BERT without token types
    "modernbert": Family(ROBERTA_INPUTS, encoder="layers", sliding_window=True),
}


class UnsupportedEncoder(ValueError):
    """The checkpoint is not an encoder of a family this export knows."""


def family_of(model_type: str | None) -> Family:
    """The family of a config's `model_type`, or a refusal naming the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedEncoder(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def hidden_size(config: Mapping) -> int:
    """The width of the token states of `config` (config.json's contents): DistilBERT calls it `dim`."""
    return int(config.get("hidden_size") or config["dim"])


def max_positions(config: Mapping) -> int:
    """The longest input the position table of `config` (config.json's contents) allows: all of it
    for BERT (and ModernBERT's rotary positions: the length it was trained for), less the rows
    RoBERTa-style families skip (514 rows hold 512 positions)."""
    family = family_of(config.get("model_type"))
    rows = int(config["max_position_embeddings"])
    if family.padding_idx is None:
        return rows
    padding_idx = family.padding_idx if isinstance(family.padding_idx, int) else config[family.padding_idx]
    return rows - int(padding_idx) - 1
