"""The core on a GPU with our kernels against the same core on the PyTorch reference ops.

    python bench/core_kernels_gpu.py --layers 6 --out result.md

On a random bf16 DeepSeek-V2-Lite-shaped checkpoint: (1) greedy tokens of the kernel path against
the reference path, with the first divergence (if any) explained by the logit gap at that step;
(2) decode tokens/s of the engine at several concurrencies, kernels on and off, side by side.
The kernels are switched off and on with kernels.dispatch.force_references.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core_generate import build_v2_lite, prompts, run_engine  # noqa: E402

from core.engine import Engine  # noqa: E402
from core.engine.kv_cache import SlotKVCache  # noqa: E402
from core.model.loader import load_model  # noqa: E402
from kernels import dispatch  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def set_kernels(on: bool) -> None:
    dispatch.force_references(not on)


@torch.inference_mode()
def greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode with a KV cache: one prefill, then one token per step (the engine's path)."""
    cache = SlotKVCache(model.cache_layout(), 1, len(prompt) + steps + 1, torch.bfloat16, torch.device("cuda"))
    slot = torch.tensor([cache.allocate()], device="cuda")
    tokens = torch.tensor([prompt], device="cuda")
    logits = model(tokens, torch.tensor([0], device="cuda"), cache, slot, last_only=True)[0, -1].float()
    out, seen = [], []
    for step in range(steps):
        seen.append(logits)
        nxt = int(logits.argmax())
        out.append(nxt)
        pos = torch.tensor([len(prompt) + step], device="cuda")
        logits = model(torch.tensor([[nxt]], device="cuda"), pos, cache, slot)[0, -1].float()
    return out, seen


def compare(model, vocab: int, steps: int) -> str:
    lines = []
    for i, prompt in enumerate(prompts(vocab, 4, 32)):
        set_kernels(True)
        ours, ours_logits = greedy(model, prompt, steps)
        set_kernels(False)
        ref, ref_logits = greedy(model, prompt, steps)
        same = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        gap = max((a - b).abs().max().item() for a, b in zip(ours_logits, ref_logits))
        if same is None:
            lines.append(f"| {i} | {steps} identical | - | {gap:.3f} |")
        else:
            r = ref_logits[same]
            top2 = r.topk(2).values
            lines.append(f"| {i} | first {same} identical | step {same}: reference margin top1-top2 "
                         f"{(top2[0] - top2[1]).item():.3f} | {gap:.3f} |")
    return "\n".join(["| prompt | greedy tokens, kernels vs reference | divergence | max abs logit diff |",
                      "| --- | --- | --- | --- |", *lines])


def speed(path: Path, levels: list[int], max_tokens: int, vocab: int) -> str:
    """Decode tokens/s of the engine: reference ops (eager: their MoE syncs the host, so it cannot
    be captured), our kernels eager, and our kernels with decode steps replayed from CUDA graphs."""
    runs = (("reference", False, False), ("kernels", True, False), ("graphs", True, True))
    rows = ["| concurrency | reference ops tok/s | our kernels tok/s | our kernels + CUDA graphs tok/s "
            "| kernels / reference | kernels + graphs / reference | greedy streams, graphs = eager kernels |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in levels:
        result, streams = {}, {}
        for name, kernels_on, graphs in runs:
            set_kernels(kernels_on)
            model = load_model(path, dtype="bf16", device="cuda")
            engine = Engine(model, model_tokenizer(path), max_batch=max(c, 8), max_seq_len=512, cuda_graphs=graphs)
            batch = prompts(vocab, c, 32)
            run_engine(engine, batch, 8)  # warm up: compile every shape (and capture its graphs) first
            runs_ = [run_engine(engine, batch, max_tokens) for _ in range(2)]
            engine.close()
            del model, engine
            torch.cuda.empty_cache()
            result[name] = max(r["tok_s"] for r in runs_)
            streams[name] = runs_[0]["tokens"]
            log(f"  c={c} {name}: {result[name]:.0f} tok/s")
        ref = result["reference"]
        same = sum(a == b for a, b in zip(streams["graphs"], streams["kernels"]))
        rows.append(f"| {c} | {ref:.0f} | {result['kernels']:.0f} | {result['graphs']:.0f} | "
                    f"{result['kernels'] / ref:.2f}x | {result['graphs'] / ref:.2f}x | {same} / {c} |")
    return "\n".join(rows)


def model_tokenizer(path: Path):
    from core.tokenizer import Tokenizer

    return Tokenizer(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meridian-gpu-"))
    log(f"building a random V2-Lite-shaped checkpoint ({args.layers} layers) in {work}")
    path = build_v2_lite(work / "v2-lite", args.layers, "cuda")
    model = load_model(path, dtype="bf16", device="cuda")
    vocab = model.config.vocab_size
    log("greedy tokens, kernels vs reference")
    table1 = compare(model, vocab, args.steps)
    del model
    torch.cuda.empty_cache()
    log("decode throughput, kernels on and off")
    table2 = speed(path, [int(c) for c in args.concurrency.split(",")], args.max_tokens, vocab)
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n\n"
            f"{table1}\n\n{table2}\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
