"""Benchmark of one routed-experts MoE layer (routed tokens -> output) on a CUDA GPU, under CUDA
graph replay: our Triton kernel, torch._grouped_mm with its permute/unpermute, the naive
per-expert loop of the reference, and the roofline. Also the router kernel on its own.

    python bench/moe_kernels.py [--shapes v2lite,v3,mixtral] [--tokens 1,4,...] [--json out.json]

Roofline: max(weights of the experts actually hit / measured copy bandwidth,
FLOPs / 790 TFLOP/s); the measured bf16 matmul rate is printed beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import importlib

from kernels import reference

fm = importlib.import_module("kernels.fused_moe")
router = importlib.import_module("kernels.router")

SHAPES = {  # name: (experts, hidden, expert inter, top_k)
    "v2lite": (64, 2048, 1408, 6),
    "v3": (32, 7168, 2048, 8),
    "mixtral": (8, 4096, 14336, 2),
}
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
PEAK_FLOPS = 790e12
ROUTINGS = 4  # distinct routings per graph replay, so repeated experts do not sit in L2


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), graph=False)
    return 2 * a.numel() / (t * 1e-6)


def matmul_rate() -> float:
    """bf16 8192^3 matrix product, FLOP/s, on random data."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, graph=False)
    return 2 * 8192**3 / (t * 1e-6)


def time_fn(fn, graph: bool = True, budget_ms: float = 150.0) -> float:
    """Median microseconds of fn() (a CUDA graph of it when `graph`), after warm-up."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    # >= 20 replays: a median that holds at 4096 tokens
    n = int(min(200, max(20, budget_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(n):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


_WORKER_LAYER: dict = {}


def _compile_task(task: dict) -> str:
    """Run one kernel launch of `task` once on uninitialised tensors of the real shapes, so that
    Triton compiles it into its on-disk cache (run in a worker process; see `precompile`)."""
    try:
        e, h, i, k = SHAPES[task["shape"]]
        fp8 = task.get("fp8", False)
        key = (task["shape"], fp8)
        if key not in _WORKER_LAYER:
            _WORKER_LAYER.clear()
            torch.cuda.empty_cache()
            wdt = torch.float8_e4m3fn if fp8 else torch.bfloat16
            w13 = torch.empty(e, 2 * i, h, device="cuda", dtype=wdt)
            w2 = torch.empty(e, h, i, device="cuda", dtype=wdt)
            sc = {}
            if fp8:
                sc = {
                    "w13_scale": torch.ones(e, -(-2 * i // 128), -(-h // 128), device="cuda"),
                    "w2_scale": torch.ones(e, -(-h // 128), -(-i // 128), device="cuda"),
                }
            _WORKER_LAYER[key] = (w13, w2, sc)
        w13, w2, sc = _WORKER_LAYER[key]
        t = task["tokens"]
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        w, ids = make_routing(t, e, k, 0)
        kind = task["kind"]
        if kind == "layer":
            fm.fused_moe(x, w13, w2, w, ids, config=task.get("config"), **sc)
        else:
            bm, cfg, pdl = task["bm"], task["cfg"], task.get("pdl", False)  # pdl: as the layer chains them
            pl = fm.plan(ids, e, bm)
            buf, cnt = fm.workspace(t, h, x.device)
            out = buf[: t * h].view(t, h)
            hh = torch.empty(pl.max_blocks * bm, i, dtype=x.dtype, device="cuda")
            xq, xs, hq, hs = x, None, hh, None
            if fm.quantizes_once(fp8, t * k):  # the activations as the layer quantizes them
                (xq, xs), (hq, hs) = fm.quant_activations(x), fm.quant_activations(hh)
            if kind == "gate_up":
                fm.gate_up(xq, w13, hh, buf, pl, k, cfg, bm, sc.get("w13_scale"), pdl=pdl, x_scale=xs)
            else:
                fused = fm.casts_in_down(x)
                fm.down(
                    hq,
                    w2,
                    out,
                    pl,
                    w,
                    k,
                    cfg,
                    bm,
                    sc.get("w2_scale"),
                    final=torch.empty_like(x) if fused else None,
                    counters=cnt if fused else None,
                    pdl=pdl,
                    h_scale=hs,
                )
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 -- a candidate that cannot compile is skipped later
        return f"{task.get('kind')} {task.get('cfg')}: {type(exc).__name__}"


def precompile(tasks: list[dict], workers: int) -> None:
    """Compile the kernels of `tasks` in `workers` processes at once (Triton's cache on disk is
    shared), so the timing loop that follows compiles nothing itself."""
    if workers <= 1 or not tasks:
        return
    import multiprocessing as mp
    import time

    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [r for r in pool.map(_compile_task, tasks, chunksize=1) if r]
    print(f"precompiled {len(tasks)} launches in {time.time() - t0:.0f} s ({len(errors)} failed)", flush=True)


def make_layer(e, h, i, dtype=torch.bfloat16):
    """Random expert weights of a layer (random, not zeros: zeros run faster)."""
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=dtype) / math.sqrt(h)
    w2 = torch.randn(e, h, i, device="cuda", dtype=dtype) / math.sqrt(i)
    return w13, w2


def make_routing(t, e, k, seed):
    """Distinct uniformly random experts per token, softmax weights: (weights fp32, ids int32)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.rand(t, e, device="cuda", generator=g).argsort(-1)[:, :k].int()
    w = torch.rand(t, k, device="cuda", generator=g).softmax(-1)
    return w, ids


def grouped_mm_moe(x, w13, w2, wts, ids):
    """Baseline: permute by expert, torch._grouped_mm twice, unpermute with an index_add."""
    t, k = ids.shape
    e, inter = w13.shape[0], w2.shape[2]
    flat = ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    tok = order // k
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offs = counts.cumsum(0, dtype=torch.int32)
    gu = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)
    hmid = F.silu(gu[:, :inter]) * gu[:, inter:]
    y = torch._grouped_mm(hmid, w2.transpose(1, 2), offs=offs)
    y = y.float() * wts.reshape(-1)[order, None]
    out = torch.zeros(t, w2.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y)
    return out.to(x.dtype)


def roofline_us(routings, e, h, i, bw, fp8=False):
    """Mean over routings of max(hit-expert weight bytes / bw, FLOPs / 790 TFLOP/s)."""
    per_expert = 3 * h * i * (1 if fp8 else 2)
    out = []
    for _, ids in routings:
        hit = ids.unique().numel()
        flops = 2 * ids.numel() * 3 * h * i
        out.append(max(hit * per_expert / bw, flops / PEAK_FLOPS) * 1e6)
    return sum(out) / len(out)


def bench_shape(name, tokens, bw, naive_max_tokens, fp8=False, baselines=("grouped_mm",)):
    """Rows of (tokens, us and fraction of roofline per implementation) for one layer shape."""
    e, h, i, k = SHAPES[name]
    w13, w2 = make_layer(e, h, i)
    scales = {}
    if fp8:
        w13, s13 = reference.quant_fp8_blocks(w13)
        w2, s2 = reference.quant_fp8_blocks(w2)
        scales = {"w13_scale": s13, "w2_scale": s2}
    rows = []
    for t in tokens:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        routings = [make_routing(t, e, k, seed) for seed in range(ROUTINGS)]
        roof = roofline_us(routings, e, h, i, bw, fp8)
        row = {"shape": name + ("-fp8" if fp8 else ""), "tokens": t, "roofline_us": roof}

        def ours(x=x, routings=routings):
            for w, ids in routings:
                fm.fused_moe(x, w13, w2, w, ids, **scales)

        def grouped(x=x, routings=routings):
            for w, ids in routings:
                grouped_mm_moe(x, w13, w2, w, ids)

        impls = [("triton", ours)] + (
            [] if fp8 or "grouped_mm" not in baselines else [("grouped_mm", grouped)]
        )
        for label, fn in impls:
            try:
                row[label + "_us"] = time_fn(fn) / ROUTINGS
            except Exception as exc:  # noqa: BLE001 -- a baseline that cannot run here must not stop the table
                row[label + "_us"] = None
                row[label + "_error"] = repr(exc)[:200]
                print(f"{name} T={t} {label}: {exc!r}"[:300], file=sys.stderr)
        if not fp8 and t <= naive_max_tokens:
            w, ids = routings[0]
            row["naive_us"] = time_fn(
                lambda x=x, w=w, ids=ids: reference.fused_moe(x, w13, w2, w, ids), graph=False, budget_ms=50
            )
        rows.append(row)
        print(fmt_row(row), flush=True)
    return rows


def fmt_row(r) -> str:
    """One table line: microseconds and % of roofline per implementation."""

    def cell(key):
        us = r.get(key)
        return f"{'-':>16}" if us is None else f"{us:9.1f} {100 * r['roofline_us'] / us:5.0f}%"

    return (
        f"{r['shape']:>12} {r['tokens']:>6} {r['roofline_us']:9.1f} "
        f"{cell('triton_us')} {cell('grouped_mm_us')} {cell('naive_us')}"
    )


HEADER = (
    f"{'shape':>12} {'tokens':>6} {'roof_us':>9} {'triton us  %roof':>16} "
    f"{'grouped_mm us %':>16} {'naive us %':>16}"
)


def bench_router(tokens):
    """Router kernel alone vs the reference's torch ops, both graph-replayed."""
    cases = {
        "v3-256e-sigmoid-grouped": (
            256,
            8,
            {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5},
        ),
        "mixtral-8e-softmax": (8, 2, {"scoring": "softmax"}),
        "v2lite-64e-softmax": (64, 6, {"scoring": "softmax", "norm_topk_prob": False}),
    }
    rows = []
    for name, (e, k, kw) in cases.items():
        if kw.get("scoring") == "sigmoid":
            kw = dict(kw, correction_bias=torch.randn(e, device="cuda") * 0.1)
        for t in tokens:
            logits = torch.randn(t, e, device="cuda", dtype=torch.bfloat16)
            # 8 calls per graph replay: one replay's launch cost would dwarf one small kernel
            kt = time_fn(lambda lg=logits, k=k, kw=kw: [router.route(lg, k, **kw) for _ in range(8)]) / 8
            rt = time_fn(lambda lg=logits, k=k, kw=kw: [reference.route(lg, k, **kw) for _ in range(8)]) / 8
            rows.append({"router": name, "tokens": t, "triton_us": kt, "torch_us": rt})
            print(f"{name:>26} {t:>6} triton {kt:8.1f} us   torch ops {rt:8.1f} us", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="v2lite,v3,mixtral")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--naive-max-tokens", type=int, default=4096)
    p.add_argument("--fp8", action="store_true", help="also the fp8 w8a8 path on the V3 shape")
    p.add_argument("--baselines", default="grouped_mm", help="comma list; empty for ours alone")
    p.add_argument("--no-router", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--precompile", type=int, default=0, help="compile every point first in N processes")
    p.add_argument("--no-pdl", action="store_true", help="launch the down GEMM after gate/up, not during its tail")
    args = p.parse_args()
    fm.PDL = not args.no_pdl
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = args.shapes.split(",")
    tasks = [{"kind": "layer", "shape": n, "tokens": t} for n in shapes for t in tokens]
    tasks += [{"kind": "layer", "shape": "v3", "tokens": t, "fp8": True} for t in tokens] if args.fp8 else []
    precompile(tasks, args.precompile)
    torch.manual_seed(0)
    bw, rate = copy_bandwidth(), matmul_rate()
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__,
        "copy_bw_TBps": bw / 1e12,
        "bf16_matmul_TFLOPs": rate / 1e12,
        "peak_TFLOPs_used": 790,
        "pdl": fm.PDL,
    }
    print(json.dumps(meta), flush=True)
    print(HEADER, flush=True)
    rows = []
    for name in shapes:
        try:
            rows += bench_shape(name, tokens, bw, args.naive_max_tokens, baselines=args.baselines.split(","))
            torch.cuda.empty_cache()  # the layer's weights are gone with bench_shape's frame
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: {exc!r}", file=sys.stderr)
    if args.fp8:
        try:
            rows += bench_shape("v3", tokens, bw, 0, fp8=True)
        except Exception as exc:  # noqa: BLE001
            print(f"v3 fp8: {exc!r}", file=sys.stderr)
    router_rows = []
    try:
        router_rows = [] if args.no_router else bench_router([1, 64, 4096])
    except Exception as exc:  # noqa: BLE001
        print(f"router: {exc!r}", file=sys.stderr)
    print(HEADER)
    for r in rows:
        print(fmt_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "moe": rows, "router": router_rows}, indent=1))


if __name__ == "__main__":
    main()
