"""The layout of an exported edge model folder, shared by the encoder and the small LM.

`model.onnx` (fp32), `tokenizer.json` and `meta.json` are always there; `model.int8.onnx` only when
the int8 weights passed their quality gate at build time, which `meta.json`'s "int8" record says.
Past protobuf's 2 GiB a graph's weights sit beside it in `<graph>.data`; `meta.json`'s "files" lists
every file of the build beyond `model.onnx` and itself.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"  # the same graph with dynamic int8 weights (optional)
# A graph whose weights are too large for protobuf keeps them in one file beside it (edge.onnx_weights).
MODEL_DATA_FILE = MODEL_FILE + ".data"
INT8_MODEL_DATA_FILE = INT8_MODEL_FILE + ".data"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"


class NoInt8Weights(FileNotFoundError):
    """int8 was asked for, and this export has none (its gate failed, or it was built without)."""


def weights_file(model_dir: Path, *, int8: bool, export_command: str) -> Path:
    """The ONNX file to serve from `model_dir`, once the files every export has are there."""
    for name in (MODEL_FILE, TOKENIZER_FILE, META_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing: run `{export_command} DIR` first")
    if not int8:
        return model_dir / MODEL_FILE
    if (model_dir / INT8_MODEL_FILE).is_file():
        return model_dir / INT8_MODEL_FILE
    raise NoInt8Weights(f"{model_dir} has no int8 weights: {_why_no_int8(model_dir)}; serve it without int8")


def _why_no_int8(model_dir: Path) -> str:
    """What the build recorded about its int8 weights."""
    record = json.loads((model_dir / META_FILE).read_text()).get("int8")
    if not isinstance(record, dict) or "gate" not in record:
        return "the export was built without them"
    measured = {k: v for k, v in record.items() if k in ("top1_agreement", "min_cosine_to_fp32")}
    figures = ", ".join(f"{k} {v}" for k, v in measured.items())
    return f"they measured {figures} against fp32 at build time, short of the gate {record['gate']}"
