"""Checkpoint directory -> our model: config.json picks the family, safetensors fill the weights.

Handles single-file and sharded (`model.safetensors.index.json`) checkpoints, bf16/fp16/fp32 weights
and block-scaled fp8 ones (`weight_scale_inv`, dequantised at load). Routed experts stored one
tensor per expert (as Hugging Face checkpoints do) are stacked into the gathered layout, and layers
we run as one product (`MergedLinear`: gate and up, MLA's two down-projections) stacked by rows.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from core.model.config import ModelConfig
from core.model.layers import MergedLinear, RotaryEmbedding

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Per-expert checkpoint tensors -> (our stacked parameter, which half of gate_up: 0 gate, 1 up, None whole).
_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_EXPERT_PROJ = {
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None),
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),  # Mixtral
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


# model_type -> the module and class of its model, imported when asked for. DeepSeek-V2 runs on the
# V3 code (its config says how it routes).
_FAMILY_CLASSES = {
    "deepseek_v3": ("core.model.deepseek_v3", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("core.model.deepseek_v3", "DeepseekV3ForCausalLM"),
    "qwen3_moe": ("core.model.qwen3_moe", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("core.model.qwen2_moe", "Qwen2MoeForCausalLM"),
    "olmoe": ("core.model.olmoe", "OlmoeForCausalLM"),
    "mixtral": ("core.model.mixtral", "MixtralForCausalLM"),
}


def family(model_type: str) -> type[nn.Module]:
    """The model class for a config's model_type."""
    if model_type not in _FAMILY_CLASSES:
        raise ValueError(f"unsupported model_type {model_type!r}")
    module, name = _FAMILY_CLASSES[model_type]
    return getattr(importlib.import_module(module), name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 ... -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _open(file: Path):
    """A safetensors handle on `file`; one this process may not read is said so."""
    if not os.access(file, os.R_OK):  # safetensors would say "No such file or directory"
        raise PermissionError(f"{file} is not readable by this process (uid {os.getuid()})")
    return safe_open(file, "pt")


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    out = {}
    for file in files:
        with _open(file) as f:
            out.update({name: file for name in f.keys()})
    return out


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 weight [out, in] times its per-block scale [ceil(out/b0), ceil(in/b1)] -> fp32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _read(files: dict[str, Path], name: str, cfg: ModelConfig, handles: dict) -> torch.Tensor:
    """One checkpoint tensor, dequantised when it is fp8 with a block scale."""
    file = files[name]
    if file not in handles:
        handles[file] = _open(file)
    tensor = handles[file].get_tensor(name)
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale_name = name + "_scale_inv"
        if scale_name not in files:
            raise ValueError(f"fp8 tensor {name} has no {scale_name}")
        scale = _read(files, scale_name, cfg, handles)
        tensor = dequantize_fp8(tensor, scale, cfg.fp8_block or (128, 128))
    return tensor


def load_model(path: Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> nn.Module:
    """Build the family's model for the checkpoint at `path` and load its weights, in eval mode."""
    path = Path(path)
    cfg = ModelConfig.from_file(path)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = family(cfg.model_type)(cfg)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_tables()
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    merged = merged_parts(model)
    filled: set[str] = set()
    files = weight_files(path)
    handles: dict = {}
    for name in files:
        if name.endswith("_scale_inv"):
            continue
        layer = _LAYER_KEY.match(name)
        if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
            continue  # multi-token-prediction layers sit past the last decoder layer
        expert = _EXPERT_KEY.match(name)
        if expert and expert.group("proj") in _EXPERT_PROJ:
            target, half = _EXPERT_PROJ[expert.group("proj")]
            key = f"{expert.group('prefix')}.{target}"
            if key not in params:
                raise ValueError(f"checkpoint tensor {name} has no place in {type(model).__name__}")
            dest = params[key][int(expert.group("expert"))]
            if half is not None:
                rows = dest.shape[0] // 2
                dest = dest[half * rows : (half + 1) * rows]
            key = f"{key}[{expert.group('expert')}]{'' if half is None else half}"
        elif name in merged:
            target, begin, rows = merged[name]
            dest, key = params[target][begin : begin + rows], name
        elif name in params:
            dest, key = params[name], name
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise ValueError(f"checkpoint tensor {name} has no place in {type(model).__name__}")
        tensor = _read(files, name, cfg, handles)
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
        filled.add(key)
    if cfg.tie_word_embeddings and "lm_head.weight" not in files:
        with torch.no_grad():
            params["lm_head.weight"].copy_(params["model.embed_tokens.weight"])
        filled.add("lm_head.weight")
    _check_complete(model, merged, filled)
    _cast(model, dtype)
    return model.eval().requires_grad_(False)


def merged_parts(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Checkpoint tensor -> (our merged parameter, first row, rows) for every MergedLinear part."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MergedLinear):
            parent = name.rpartition(".")[0]
            begin = 0
            for part, rows in module.parts.items():
                for kind in ("weight", "bias") if module.bias is not None else ("weight",):
                    out[f"{parent}.{part}.{kind}" if parent else f"{part}.{kind}"] = (f"{name}.{kind}", begin, rows)
                begin += rows
    return out


def _check_complete(model: nn.Module, merged: dict[str, tuple[str, int, int]], filled: set[str]) -> None:
    """Every parameter must have come from the checkpoint (experts: every expert, both halves;
    merged layers: every part)."""
    parts: dict[str, set[str]] = {}
    for source, (target, _, _) in merged.items():
        parts.setdefault(target, set()).add(source)
    missing = []
    for name, p in model.named_parameters():
        if name in filled:  # also experts stored already stacked
            continue
        if name.endswith("gate_up_proj"):
            need = {f"{name}[{e}]{h}" for e in range(p.shape[0]) for h in (0, 1)}
        elif name.endswith("experts.down_proj"):
            need = {f"{name}[{e}]" for e in range(p.shape[0])}
        else:
            need = parts.get(name, {name})
        if not need <= filled:
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    # Buffers that checkpoints may omit keep their defaults, except the routing bias, which must load.
    for name, _ in model.named_buffers():
        if name.endswith("e_score_correction_bias") and name not in filled:
            raise ValueError(f"checkpoint lacks {name}")


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Weights to `dtype`; the routing bias and rotary tables stay fp32 (they decide and position)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if name not in ("e_score_correction_bias", "inv_freq"):
                module._buffers[name] = b.to(dtype)
