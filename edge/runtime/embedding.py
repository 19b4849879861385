"""Sentence embeddings from an exported encoder: tokenize, run ONNX, pool (mean or CLS), project
(an optional Dense layer), L2-normalise.

No server code here: the mobile SDK runs this same loop on device. The model folder is what
`edge.export.build_embedding_model` writes: `model.onnx`, `tokenizer.json` and `meta.json`, and
`dense.npz` for a model with a Dense layer after its pooling.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer, normalizers

from edge.runtime.model_dir import META_FILE, TOKENIZER_FILE, weights_file
from edge.runtime.sessions import cpu_session

# What one extra session.run costs, in padded tokens: ~1.3 ms of fixed cost per call against ~0.21 ms
# per token on one core (all-MiniLM-L6-v2, measured at batch 1 and 8), doubled because small calls
# also run the GEMMs less efficiently. It decides when a batch is worth splitting by length.
CALL_COST_TOKENS = 16
# Split only when that saves at least this share of the one-call cost: below it the saving is lost
# in the noise of the cost model (and smaller calls give the GEMM kernels less to work with).
MIN_SPLIT_SAVING = 0.1


@dataclass(frozen=True)
class EmbeddingMeta:
    """What `meta.json` says about an exported embedding model."""

    dimension: int
    max_seq_length: int
    pooling: str
    normalize: bool
    fingerprint: str
    # What batches are padded with; exports before the encoder families recorded none (BERT's [PAD]).
    pad_id: int = 0
    pad_token: str = "[PAD]"
    prompt: str = ""  # put before every text, as sentence-transformers' default prompt is
    lowercase: bool = False  # lowercase every text before its tokenizer's own normalisation
    dense_activation: str | None = None  # a Dense layer after pooling (DENSE_FILE), with this activation

    @classmethod
    def read(cls, model_dir: Path) -> EmbeddingMeta:
        """Read and check `meta.json` in `model_dir`."""
        raw = json.loads((model_dir / META_FILE).read_text())
        padding = raw.get("padding") or {}
        meta = cls(
            dimension=int(raw["dimension"]),
            max_seq_length=int(raw["max_seq_length"]),
            pooling=str(raw["pooling"]),
            normalize=bool(raw["normalize"]),
            fingerprint=str(raw.get("fingerprint", "")),
            pad_id=int(padding.get("pad_id", 0)),
            pad_token=str(padding.get("pad_token", "[PAD]")),
            prompt=str(raw.get("prompt", "")),
            lowercase=bool(raw.get("lowercase", False)),
            dense_activation=(raw.get("dense") or {}).get("activation"),
        )
        if meta.dense_activation is not None and meta.dense_activation not in ACTIVATIONS:
            raise ValueError(f"{model_dir}: Dense activation {meta.dense_activation!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        if meta.pooling not in POOLINGS:
            raise ValueError(f"{model_dir}: pooling {meta.pooling!r} is not supported; supported: {', '.join(POOLINGS)}")
        return meta


ACTIVATIONS = {"identity": lambda v: v, "tanh": np.tanh, "relu": lambda v: np.maximum(v, 0.0)}
DENSE_FILE = "dense.npz"  # weight [out, in] and, when the layer has one, bias [out]


@dataclass(frozen=True)
class Dense:
    """sentence-transformers' Dense module after the pooling: activation(v @ weight.T + bias)."""

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str

    @classmethod
    def load(cls, model_dir: Path, activation: str) -> Dense:
        """The layer `edge.export` wrote to DENSE_FILE."""
        path = model_dir / DENSE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: meta.json names a Dense layer; export the model again")
        with np.load(path) as arrays:
            bias = arrays["bias"].astype(np.float32) if "bias" in arrays else None
            return cls(arrays["weight"].astype(np.float32), bias, activation)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        out = vectors @ self.weight.T
        return ACTIVATIONS[self.activation](out if self.bias is None else out + self.bias)


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings of a batch, in input order, and the tokens they consumed."""

    vectors: np.ndarray  # float32 [N, dimension]
    prompt_tokens: int  # tokens fed to the model after truncation, [CLS]/[SEP] included
    token_counts: tuple[int, ...] = ()  # prompt tokens of each input, when known


class EmbeddingModel:
    """ONNX Runtime CPU sessions (instances) plus their tokenizer; `embed` is safe to call from several
    threads, each call running on a free instance.

    Concurrent calls on one session would share its intra-op pool and slow each other down; with an
    instance per inference thread (Triton's instance groups), two batches run side by side, so one
    computes while the other's callers turn around.
    """

    def __init__(
        self, sessions: Sequence[ort.InferenceSession], tokenizer: Tokenizer, meta: EmbeddingMeta,
        dense: Dense | None = None,
    ) -> None:
        if not sessions:
            raise ValueError("at least one session is required")
        self.sessions = list(sessions)
        self.tokenizer = tokenizer
        self.meta = meta
        self.dense = dense
        self._pool = POOLINGS[meta.pooling]
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for session in self.sessions:
            self._free.put(session)
        # Only BERT-family graphs take token_type_ids: feed what the graph declares.
        self._input_names = {i.name for i in self.session.get_inputs()}

    @property
    def session(self) -> ort.InferenceSession:
        """The first instance: for reading the graph (its inputs, the export's checks)."""
        return self.sessions[0]

    @classmethod
    def load(
        cls, model_dir: Path | str, threads: int = 1, *, int8: bool = False, instances: int = 1
    ) -> EmbeddingModel:
        """Load an exported model folder; `threads` bounds each instance's intra-op pool."""
        model_dir = Path(model_dir)
        weights = weights_file(model_dir, int8=int8, export_command="python -m edge.export")
        meta = EmbeddingMeta.read(model_dir)
        dense = None if meta.dense_activation is None else Dense.load(model_dir, meta.dense_activation)
        sessions = [cpu_session(weights, threads) for _ in range(max(1, instances))]
        return cls(sessions, _tokenizer(model_dir / TOKENIZER_FILE, meta), meta, dense)

    @property
    def dimension(self) -> int:
        """Length of each embedding vector."""
        return self.meta.dimension

    @property
    def pooled_dimension(self) -> int:
        """Length of the pooled token states: the embedding's, unless a Dense layer follows."""
        return self.dimension if self.dense is None else self.dense.in_features

    def encode(self, texts: list[str]) -> list[Encoding]:
        """The token encodings of `texts`, after the model's prompt, truncated and padded as one batch."""
        prompt = self.meta.prompt
        return self.tokenizer.encode_batch([prompt + t for t in texts] if prompt else texts)

    def embed(self, texts: list[str]) -> EmbedResult:
        """Embed `texts` exactly as sentence-transformers would (its default prompt, the model's
        pooling, then L2 norm)."""
        if not texts:
            return EmbedResult(np.zeros((0, self.dimension), np.float32), 0)
        encodings = self.encode(texts)
        inputs = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if "token_type_ids" in self._input_names:
            inputs["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        lengths = inputs["attention_mask"].sum(axis=1)
        vectors = np.empty((len(texts), self.pooled_dimension), np.float32)
        # A batch is padded to its longest input: one 256-token input among 31 short ones would make
        # the model run 32 x 256 tokens. Rows of similar length run together instead.
        session = self._free.get()  # blocks only when more threads call than there are instances
        try:
            for rows in length_groups(lengths):
                width = int(lengths[rows].max())  # padding is on the right: columns past it are padding only
                feeds = {name: np.ascontiguousarray(array[rows, :width]) for name, array in inputs.items()}
                (hidden,) = session.run(["last_hidden_state"], feeds)
                vectors[rows] = self._pool(hidden, feeds["attention_mask"])
        finally:
            self._free.put(session)
        if self.dense is not None:
            vectors = self.dense(vectors)
        if self.meta.normalize:
            vectors = l2_normalize(vectors)
        counts = tuple(int(n) for n in lengths)
        return EmbedResult(vectors.astype(np.float32, copy=False), sum(counts), counts)


def length_groups(lengths: np.ndarray, call_cost: int = CALL_COST_TOKENS) -> list[np.ndarray]:
    """Row indices split into runs of similar token length: the cheapest cuts of the length-sorted rows.

    Cost of a run = rows x its longest length (the tokens the model computes, padding included) +
    `call_cost`; the cuts minimise the total exactly (dynamic programming over the distinct lengths),
    and are taken only when they save at least MIN_SPLIT_SAVING of running everything as one call.
    """
    order = np.argsort(lengths, kind="stable")
    values, starts = np.unique(lengths[order], return_index=True)
    if len(values) == 1:
        return [order]
    ends = np.append(starts[1:], len(order))
    best = [0] * (len(values) + 1)  # best[j]: cheapest cost of the rows of the j shortest lengths
    cut = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        best[j], cut[j] = min(
            (best[i] + int(ends[j - 1] - starts[i]) * int(values[j - 1]) + call_cost, i) for i in range(j)
        )
    if best[-1] > (1 - MIN_SPLIT_SAVING) * (len(order) * int(values[-1]) + call_cost):
        return [order]
    groups, j = [], len(values)
    while j:
        groups.append(order[starts[cut[j]]:ends[j - 1]])
        j = cut[j]
    return groups[::-1]


def cls_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's first token vector (BERT's [CLS])."""
    return hidden[:, 0]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average the token vectors of each row over its real (unpadded) tokens."""
    weights = mask[:, :, None].astype(hidden.dtype)
    # The clamp mirrors sentence-transformers; it only matters for an all-padding row.
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length (zero rows stay zero), as torch's F.normalize does."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.clip(norms, 1e-12, None)


POOLINGS = {"mean": mean_pool, "cls": cls_pool}


def _tokenizer(path: Path, meta: EmbeddingMeta) -> Tokenizer:
    """The model's tokenizer, truncating at max_seq_length and padding to the batch's longest."""
    tokenizer = Tokenizer.from_file(str(path))
    own = tokenizer.normalizer
    if meta.lowercase and (own is None or own.normalize_str("A") != "a"):  # as sentence-transformers does
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([own] if own else [])])
    # A tokenizer.json may ship with truncation and fixed-length padding of its training setup
    # (all-MiniLM-L6-v2's: 128), or with none; sentence-transformers sets both, so we must too.
    tokenizer.enable_truncation(max_length=meta.max_seq_length)
    pad = tokenizer.padding or {}
    tokenizer.enable_padding(pad_id=meta.pad_id, pad_type_id=pad.get("pad_type_id", 0), pad_token=meta.pad_token)
    return tokenizer
