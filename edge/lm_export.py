"""Build the edge's small LM: a dense Hugging Face decoder exported to ONNX with its KV cache as I/O.

`python -m edge.lm_export DEST [--checkpoint DIR] [--force]` writes DEST/model.onnx (fp32),
DEST/model.int8.onnx (dynamic int8 weights, kept only if their top-1 agreement with fp32 passes the gate),
DEST/tokenizer.json and DEST/meta.json; a model past protobuf's 2 GiB keeps its weights beside each graph
(model.onnx.data, model.int8.onnx.data). Without --checkpoint it generates the local default
(`edge.lm_checkpoint`) into DEST/checkpoint first. The export counts only once its greedy tokens
equal transformers' greedy generation on fixed prompts. Build-time needs: torch, transformers, onnx.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from edge.artefacts import build_atomically, file_sha256, progress, step, torch_threads
from edge.lm_graph import DecoderStep, UnsupportedCheckpoint, check_supported, longrope_switch_at
from edge.quantize import lm_top1_agreement, quantize_int8, settle_int8
from edge.runtime.chat import ChatTemplate
from edge.runtime.generation import LMMeta, SmallLM, encode_prompt, read_tokenizer
from edge.onnx_weights import store_beside
from edge.runtime.model_dir import INT8_MODEL_FILE, META_FILE, MODEL_DATA_FILE, MODEL_FILE, TOKENIZER_FILE

if TYPE_CHECKING:
    import torch

EXPORTER_VERSION = "2"  # 2: meta.json carries the chat template
TAG = "edge.lm_export"
OPSET = 17
CHECKPOINT_DIR = "checkpoint"  # where the generated default checkpoint lives inside a build
# Greedy tokens of the export must equal transformers' on these (the gateway test uses the first).
VERIFY_PROMPTS = (
    "The edge answers",
    "Once upon a time,",
    "Question: what is the capital of France? Answer:",
    "",
    "Zürich 東京 🙂 unusual input that the corpus never saw",
)
VERIFY_TOKENS = 24
# The fixed set int8 is judged on (the gate: top-1 agreement with fp32 >= 95%).
QUALITY_PROMPTS = (
    *VERIFY_PROMPTS,
    "Dynamic batching",
    "Hello, world!",
    "def add(a, b):",
    "Monday, Tuesday,",
    "A cache near the user",
    "Water boils at",
    "The library opens",
)
QUALITY_TOKENS = 32
MIN_TOP1_AGREEMENT = 0.95


class ExportError(RuntimeError):
    """The export ran but its result does not match the PyTorch model."""


def fingerprint(checkpoint: Path | None) -> str:
    """Identify a build by recipe, toolchain and source (the generator's version, or the user's files)."""
    digest = hashlib.sha256()
    for part in (EXPORTER_VERSION, str(OPSET), metadata.version("torch"), metadata.version("transformers")):
        digest.update(part.encode() + b"\0")
    # The recipe's own source: editing the graph, the quantizer or the generator rebuilds on the next run.
    from edge import int8_matmul, lm_checkpoint, lm_graph, onnx_weights, quantize

    recipe = [lm_graph, onnx_weights, quantize, int8_matmul] + ([lm_checkpoint] if checkpoint is None else [])
    for module in recipe:
        digest.update(file_sha256(Path(module.__file__)).encode())
    if checkpoint is not None:
        for path in sorted(checkpoint.iterdir()):
            if path.suffix in (".json", ".safetensors", ".bin", ".jinja"):
                digest.update(path.name.encode() + file_sha256(path).encode())
    return f"edge-lm-v{EXPORTER_VERSION}-{digest.hexdigest()[:16]}"


def build_small_lm(dest: Path, *, force: bool = False, checkpoint: Path | None = None) -> Path:
    """Export a small LM (the generated default, or `checkpoint`) to ONNX in `dest`; skipped when built."""
    checkpoint = None if checkpoint is None else Path(checkpoint).resolve()
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    wanted = fingerprint(checkpoint)
    return build_atomically(dest, wanted, lambda out: _build(checkpoint, out, wanted), force=force, tag=TAG)


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse, before any work, a folder this export cannot take, saying what is wrong with it."""
    if not checkpoint.is_dir():
        raise UnsupportedCheckpoint(f"{checkpoint} is not a folder")
    needs = {"config.json": "the model's Hugging Face config",
             TOKENIZER_FILE: "a fast tokenizer; `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` writes one"}
    for name, what in needs.items():
        if not (checkpoint / name).is_file():
            raise UnsupportedCheckpoint(f"{checkpoint / name} is missing: {what}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:  # unreadable JSON, or a model_type transformers does not know
        raise UnsupportedCheckpoint(f"{checkpoint / 'config.json'}: {exc}") from None
    check_supported(config)
    read_chat_template(checkpoint)  # one that does not compile fails here, not on every chat request


def _build(checkpoint: Path | None, out: Path, fp: str) -> None:
    """Generate (if needed), export, describe, verify and quantize inside `out`."""
    with torch_threads(1):
        if checkpoint is None:
            from edge.lm_checkpoint import write_checkpoint

            checkpoint = out / CHECKPOINT_DIR
            checkpoint.mkdir()
            with step(TAG, "generate the default checkpoint"):
                write_checkpoint(checkpoint)
        with step(TAG, "load weights"):
            model = load_torch_model(checkpoint)
        with step(TAG, "export onnx"):
            _export_onnx(model, out / MODEL_FILE)
            if store_beside(out / MODEL_FILE, MODEL_DATA_FILE):
                progress(TAG, f"  weights past protobuf's limit: kept beside the graph in {MODEL_DATA_FILE}")
        with step(TAG, "check onnx graph"):
            import onnx

            onnx.checker.check_model(str(out / MODEL_FILE))
        shutil.copyfile(checkpoint / TOKENIZER_FILE, out / TOKENIZER_FILE)
        meta = _meta(model, checkpoint, fp, weights_beside=(out / MODEL_DATA_FILE).is_file())
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        with step(TAG, "verify greedy tokens against transformers"):
            references = _torch_references(model, out)
            # From here on only graphs run: the torch model would otherwise share the memory with
            # the ONNX sessions and the quantizer, each as large as the model.
            del model
            gc.collect()
            _verify(out, references)
        with step(TAG, "quantize int8 and measure"):
            quantize_int8(out / MODEL_FILE, out / INT8_MODEL_FILE)
            agreement = lm_top1_agreement(out, QUALITY_PROMPTS, QUALITY_TOKENS)
            progress(TAG, f"  int8 vs fp32: top-1 agreement {agreement:.1%} "
                          f"over {len(QUALITY_PROMPTS)} prompts x {QUALITY_TOKENS} tokens")
            passed = agreement >= MIN_TOP1_AGREEMENT
            if not passed:
                progress(TAG, f"  int8 weights not kept: {agreement:.1%} is below {MIN_TOP1_AGREEMENT:.0%}; fp32 only")
            settle_int8(out, meta, {"top1_agreement": round(agreement, 4), "prompts": len(QUALITY_PROMPTS),
                                    "tokens_per_prompt": QUALITY_TOKENS, "gate": MIN_TOP1_AGREEMENT}, passed=passed)


def load_torch_model(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's causal LM in fp32, eval mode, eager attention (the oracle for the export)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def torch_greedy(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    """transformers' own greedy generation: up to `steps` new tokens, ending early at EOS."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=steps, do_sample=False, pad_token_id=model.config.pad_token_id or 0,
        )
    return out[0, len(ids):].tolist()


def _export_onnx(model: torch.nn.Module, path: Path) -> None:
    """Trace one decoder step with dynamic batch, sequence and cache-length axes."""
    import torch

    wrapper = DecoderStep(model).eval()
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    past_len, seq = 2, 3  # non-trivial sizes, so nothing is specialised to 0 or 1 while tracing
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    positions = torch.arange(past_len, past_len + seq)[None]
    past = [torch.randn(1, kv_heads, past_len, head_dim) for _ in range(2 * wrapper.num_layers)]
    past_names = [f"past_{kind}_{i}" for i in range(wrapper.num_layers) for kind in ("key", "value")]
    present_names = [f"present_{kind}_{i}" for i in range(wrapper.num_layers) for kind in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past"} for name in past_names})
    axes.update({name: {0: "batch", 2: "total"} for name in present_names})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy-exporter notice and tracer hints
        torch.onnx.export(
            wrapper, (ids, positions, *past), str(path), dynamo=False,
            input_names=["input_ids", "position_ids", *past_names],
            output_names=["logits", *present_names], dynamic_axes=axes,
            opset_version=OPSET, do_constant_folding=True,
        )


def _meta(model: torch.nn.Module, checkpoint: Path, fp: str, *, weights_beside: bool = False) -> dict:
    """What the runtime needs to run the decoder loop."""
    cfg = model.config
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    context = int(cfg.max_position_embeddings)
    if getattr(cfg, "sliding_window", None):  # mistral, gemma3: attention beyond the window is not exported
        context = min(context, int(cfg.sliding_window))
    return {
        "name": checkpoint.name if checkpoint.name != CHECKPOINT_DIR else "edge-small",
        "task": "generation",
        "family": cfg.model_type,
        "vocab_size": int(cfg.vocab_size),
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(cfg.num_key_value_heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        "max_context": context,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_ids": eos_ids,
        "chat_template": read_chat_template(checkpoint),
        "rope_switch_at": longrope_switch_at(cfg),
        "files": [TOKENIZER_FILE, *([MODEL_DATA_FILE] if weights_beside else [])],
        "exporter": {"version": EXPORTER_VERSION, "torch": metadata.version("torch"),
                     "transformers": metadata.version("transformers"), "opset": OPSET,
                     "method": "torch.onnx.export(dynamo=False) of edge.lm_graph.DecoderStep"},
        "fingerprint": fp,
    }


def read_chat_template(checkpoint: Path) -> dict | None:
    """The checkpoint's chat template and the special tokens it may write, as transformers reads
    them (tokenizer_config.json or chat_template.jinja); None when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if not template:
        return None
    found = {"source": template, "bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    try:
        ChatTemplate(**found).check()
    except ValueError as exc:
        raise ExportError(f"{checkpoint}: {exc}") from None
    return found


def _torch_references(model: torch.nn.Module, out: Path) -> dict[str, list[int]]:
    """transformers' greedy tokens for each of VERIFY_PROMPTS that the export's context holds."""
    meta, tokenizer = LMMeta.read(out), read_tokenizer(out)
    references = {}
    for prompt in VERIFY_PROMPTS:
        ids = encode_prompt(tokenizer, meta, prompt)
        # Within the context the export serves: past a sliding window transformers masks what ours does not.
        steps = min(VERIFY_TOKENS, meta.max_context - len(ids))
        if steps >= 1:
            references[prompt] = torch_greedy(model, ids, steps)
    if not references:
        raise ExportError(f"a context of {meta.max_context} tokens holds none of the check prompts")
    return references


def _verify(out: Path, references: dict[str, list[int]]) -> None:
    """Greedy tokens of the ONNX loop must equal transformers' `references` (which may end early, at EOS)."""
    runtime = SmallLM.load(out, threads=1)
    for prompt, expected in references.items():
        got = runtime.greedy_ids(prompt, len(expected))
        if got != expected:
            raise ExportError(f"greedy tokens differ for {prompt!r}: onnx {got} vs torch {expected}")
    progress(TAG, f"  greedy tokens match transformers on {len(references)} prompts")


def main(argv: list[str] | None = None) -> int:
    """CLI: build the small LM into DEST; prints DEST on success."""
    parser = argparse.ArgumentParser(prog="python -m edge.lm_export", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="model folder to write, e.g. ~/.cache/meridian/edge/edge-small")
    parser.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint folder (default: generate one)")
    parser.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    args = parser.parse_args(argv)
    try:
        path = build_small_lm(args.dest.expanduser(), force=args.force,
                              checkpoint=args.checkpoint.expanduser() if args.checkpoint else None)
    except (ExportError, UnsupportedCheckpoint, FileExistsError, OSError) as exc:
        progress(TAG, f"failed: {exc}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
