"""Generation throughput and time to first token: the core engine against transformers `generate`
on the same checkpoint, at several concurrencies, side by side in one run.

    python bench/core_generate.py                              # CPU, the local default checkpoint
    python bench/core_generate.py --device cuda --dtype bf16 --shape v2-lite --layers 6 --out gpu.md

At concurrency c, c requests of `--prompt-tokens` random token ids each ask for exactly
`--max-tokens` tokens (greedy, eos ignored). The engine gets them all at once and batches them
continuously; transformers gets them as one batch to `generate` (static batching, its best case).
Throughput = c * max_tokens / wall time; TTFT = time from submission to a request's first token
(the engine: its first streamed event; transformers: the first step of the batch, via a streamer).
The table goes to stdout, to `--out` when given, and (unless --no-docs) into its section of
docs/BENCHMARKS.md (one for CPU, one for GPU, replaced each run) with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import record  # noqa: E402  (bench/ is the script's own folder)

from core.engine import Engine, GenerationRequest  # noqa: E402
from core.model.loader import load_model, resolve_dtype  # noqa: E402
from core.tokenizer import Tokenizer  # noqa: E402

# DeepSeek-V2-Lite's shape (layers cut by --layers): MLA without q low-rank, 64 routed experts top-6,
# 2 shared; its real vocabulary size, so the lm_head costs what it costs there.
V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
    n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=False,
    scoring_func="softmax", topk_method="greedy", q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
    qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096, rope_theta=10000.0,
    initializer_range=0.02, tie_word_embeddings=False,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def word_tokenizer(vocab: int):
    """One word per id ("w0".."wN"), so every generated id streams text at once (a BPE trained on a
    small corpus would leave most of a 102400-id vocabulary textless, and TTFT unmeasurable)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def build_v2_lite(dest: Path, layers: int, device: str) -> Path:
    """A random DeepSeek-V2-Lite-shaped deepseek_v3 checkpoint with `layers` layers."""
    import transformers

    if (dest / "config.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    word_tokenizer(V2_LITE["vocab_size"]).save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({}))
    cfg = transformers.AutoConfig.for_model("deepseek_v3", num_hidden_layers=layers, **V2_LITE)
    log(f"building a random {layers}-layer V2-Lite-shaped checkpoint on {device}")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    del model
    return dest


def prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    """`count` distinct random prompts of `length` token ids (fixed seed)."""
    g = torch.Generator().manual_seed(length * 1000 + count)
    return torch.randint(10, vocab, (count, length), generator=g).tolist()


def run_engine(engine: Engine, batch: list[list[int]], max_tokens: int) -> dict:
    """All of `batch` submitted at once; throughput, TTFTs and each stream's tokens."""
    done = threading.Semaphore(0)
    first: dict[int, float] = {}
    tokens: list[list[int]] = [[] for _ in batch]
    t0 = time.perf_counter()

    def handler(i: int):
        def on_event(event):
            if event.token_ids and i not in first:
                first[i] = time.perf_counter() - t0
            tokens[i].extend(event.token_ids)
            if event.finished:
                done.release()
        return on_event

    for i, ids in enumerate(batch):
        engine.submit(GenerationRequest(f"b{i}-{t0}", ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                      handler(i))
    for _ in batch:
        done.acquire()
    wall = time.perf_counter() - t0
    assert all(len(t) == max_tokens for t in tokens), [len(t) for t in tokens]
    return dict(tok_s=len(batch) * max_tokens / wall, ttft=list(first.values()), wall=wall, tokens=tokens)


class FirstStep:
    """A transformers streamer that notes when the first generated tokens arrive."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf(model, batch: list[list[int]], max_tokens: int, device: str) -> dict:
    """One static batch through transformers' generate (prompts of equal length: no padding)."""
    ids = torch.tensor(batch, device=device)
    streamer = FirstStep()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, streamer=streamer, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == max_tokens
    return dict(tok_s=len(batch) * max_tokens / wall, ttft=[streamer.first - t0] * len(batch), wall=wall)


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"`{' '.join(platform.uname())}`; CPU {cpu}, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        desc += f"; GPU {torch.cuda.get_device_name()}"
    return desc + f"; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the local default one)")
    p.add_argument("--shape", choices=["v2-lite"], help="generate a random checkpoint of this shape instead")
    p.add_argument("--layers", type=int, default=6, help="decoder layers of the generated checkpoint")
    p.add_argument("--workdir", type=Path, help="where a generated checkpoint goes (default: a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=256, help="engine prefill chunk (tokens per step)")
    p.add_argument("--repeats", type=int, default=1, help="runs per point; the best is kept")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    p.add_argument("--no-docs", action="store_true", help="do not record the table in docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    tmp = None
    if args.shape:
        if args.workdir is None:
            tmp = Path(tempfile.mkdtemp(prefix="core-bench-"))
        path = build_v2_lite((args.workdir or tmp) / f"v2-lite-{args.layers}l", args.layers, args.device)
    elif args.checkpoint:
        path = args.checkpoint
    else:
        from core.checkpoint.synthetic import MODEL_NAME, build_local_checkpoint

        path = build_local_checkpoint(Path.home() / ".cache" / "meridian" / "core" / MODEL_NAME)
    try:
        rows = bench(path, args, levels)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    command = "python bench/core_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = render(rows, args.skip_hf)
    header = (f"**Command:** `{command.strip()}`  \n**Machine:** {machine()}  \n"
              f"**Date:** {datetime.date.today().isoformat()}  \n**Checkpoint:** `{path.name}` ({args.dtype}, "
              f"{args.device}), prompts of {args.prompt_tokens} tokens, {args.max_tokens} new tokens each, greedy.\n")
    print("\n" + header + "\n" + table)
    if args.out:
        args.out.write_text(header + "\n" + table)
    if not args.no_docs:
        title = "GPU" if args.device.startswith("cuda") else "CPU"
        record(f"core_generate:{args.device.split(':')[0]}", f"### Core generation, {title}\n\n{header}\n{table}")
    return 0


def bench(path: Path, args, levels: list[int]) -> list[dict]:
    """One row per concurrency; the engine's and transformers' runs alternate, so a noisy (shared)
    machine slows both alike, and each keeps its best of --repeats."""
    dtype = resolve_dtype(args.dtype)
    log(f"loading {path} ({args.dtype}, {args.device})")
    model = load_model(path, dtype, args.device)
    engine = Engine(model, Tokenizer(path), max_batch=max(levels),
                    max_seq_len=args.prompt_tokens + args.max_tokens + 8, prefill_chunk=args.prefill_chunk)
    hf = None
    if not args.skip_hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    vocab = model.config.vocab_size
    rows = []
    try:
        for c in levels:
            batch = prompts(vocab, c, args.prompt_tokens)
            # Warm-up at this batch size: kernels compile (and autotune) per shape on first use.
            run_engine(engine, batch, 4)
            if hf is not None:
                run_hf(hf, batch, 4, args.device)
            row = dict(c=c)
            for _ in range(args.repeats):
                for name, run in (("engine", lambda: run_engine(engine, batch, args.max_tokens)),
                                  ("hf", lambda: run_hf(hf, batch, args.max_tokens, args.device))):
                    if name == "hf" and hf is None:
                        continue
                    result = run()
                    if name not in row or result["tok_s"] > row[name]["tok_s"]:
                        row[name] = result
            msg = f"c={c}: engine {row['engine']['tok_s']:.1f} tok/s"
            if hf is not None:
                msg += f", transformers {row['hf']['tok_s']:.1f} tok/s"
            log(msg)
            rows.append(row)
    finally:
        engine.close()
    return rows


def render(rows: list[dict], skip_hf: bool) -> str:
    """Markdown table; ratios against the engine at concurrency 1 and against transformers."""
    base = rows[0]["engine"]["tok_s"]
    head = "| concurrency | engine tok/s | x engine c=1 | engine TTFT p50 / max ms |"
    sep = "|---:|---:|---:|---:|"
    if not skip_hf:
        head += " transformers tok/s | transformers TTFT ms | engine / transformers |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        e = r["engine"]
        line = (f"| {r['c']} | {e['tok_s']:.1f} | {e['tok_s'] / base:.2f} | "
                f"{statistics.median(e['ttft']) * 1e3:.0f} / {max(e['ttft']) * 1e3:.0f} |")
        if not skip_hf:
            h = r["hf"]
            line += f" {h['tok_s']:.1f} | {h['ttft'][0] * 1e3:.0f} | {e['tok_s'] / h['tok_s']:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
