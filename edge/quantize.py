"""Optional int8 weights for the edge models, and the measures that keep their quality in check.

ONNX Runtime's dynamic quantization stores MatMul weights as int8 (per output channel) and
quantizes activations on the fly, so no calibration data is needed. Quality is measured against the
fp32 graph on fixed inputs: embedding cosine for the encoder, top-1 agreement for the LM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.int8_matmul import quantize_matmuls
from edge.onnx_weights import has_external_weights
from edge.runtime.model_dir import INT8_MODEL_DATA_FILE, INT8_MODEL_FILE, META_FILE

INT8_METHOD = ("dynamic int8 MatMuls as onnxruntime.quantization.quantize_dynamic writes them (QInt8 weights, "
               "per channel, MatMul with constant B), by edge.int8_matmul")


def quantize_int8(src: Path, dst: Path, keep_fp32: Sequence[str] = ()) -> list[str]:
    """Write `src`'s graph to `dst` with dynamic int8 MatMul weights; names the MatMuls left in fp32.

    `keep_fp32` holds regular expressions for node names to leave alone (layers whose activations have
    outliers that per-tensor activation scales cannot follow). Only MatMuls with a constant B are
    quantized: attention's activation x activation products stay fp32, and Gather (embedding tables)
    in int8 costs accuracy for no speed on CPU. A graph whose weights sit beside it gets int8
    weights beside it too (`<dst>.data`).
    """
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    excluded = [n.name for n in graph.node if n.op_type == "MatMul" and any(re.search(k, n.name) for k in keep_fp32)]
    beside = f"{dst.name}.data" if has_external_weights(graph) else None  # INT8_MODEL_DATA_FILE
    quantize_matmuls(src, dst, exclude=excluded, data_name=beside)
    return excluded


def settle_int8(out: Path, meta: dict, measured: dict, *, passed: bool) -> None:
    """Keep the int8 weights in build `out` only if they passed their gate; meta.json records the
    measure either way.

    int8 is optional: a failed gate leaves a build that serves in fp32 (and refuses int8, saying
    why), not no build. Checkpoints whose top choices are close calls, such as random weights,
    fail it; the default models pass with room to spare.
    """
    meta["int8"] = {"method": INT8_METHOD, **measured, "kept": passed}
    int8_files = [name for name in (INT8_MODEL_FILE, INT8_MODEL_DATA_FILE) if (out / name).is_file()]
    if passed:  # the int8 files count as part of the build only once they are measured
        meta["files"] = [*meta["files"], *int8_files]
    else:
        for name in int8_files:
            (out / name).unlink()
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def embedding_cosine(model_dir: Path, texts: Sequence[str]) -> float:
    """The lowest cosine between int8 and fp32 embeddings of `texts`."""
    from edge.runtime.embedding import EmbeddingModel

    fp32 = EmbeddingModel.load(model_dir, threads=1).embed(list(texts)).vectors
    int8 = EmbeddingModel.load(model_dir, threads=1, int8=True).embed(list(texts)).vectors
    cosine = (fp32 * int8).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    return float(cosine.min())


def lm_top1_agreement(model_dir: Path, prompts: Sequence[str], steps: int) -> float:
    """How often int8 picks fp32's top token, along fp32's greedy path of `steps` tokens per prompt."""
    from edge.runtime.generation import SmallLM

    fp32 = SmallLM.load(model_dir, threads=1)
    int8 = SmallLM.load(model_dir, threads=1, int8=True)
    agree = total = 0
    for prompt in prompts:
        # Teacher forcing: both read fp32's tokens, so one early disagreement does not derail the rest.
        path = fp32.greedy_ids(prompt, steps)
        ids = fp32.encode(prompt)
        ref = fp32.next_logits_along(ids, path)
        got = int8.next_logits_along(ids, path)
        agree += int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
        total += len(path)
    return agree / max(1, total)
