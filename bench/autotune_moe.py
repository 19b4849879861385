"""Tune the fused MoE kernels' block sizes per shape and token count on this GPU, and write them
as JSON (kernels/configs/E<e>_H<h>_I<i>_bf16_<GPU>.json), read by
`kernels.fused_moe.get_config`.

    python bench/autotune_moe.py [--shapes v2lite,v3,mixtral] [--tokens 1,4,...] [--out DIR]

For each token count and each candidate BLOCK_M (shared by both GEMMs and the alignment), the
gate/up and the down kernels are timed apart over their own candidates; the fastest sum wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernels import ROUTINGS, SHAPES, TOKENS, fm, make_layer, make_routing, time_fn

# (BLOCK_N, BLOCK_K, num_warps, num_stages): small row blocks stream weights (memory-bound),
# large ones feed the tensor cores.
SMALL_GU = [
    (32, 128, 4, 4),
    (64, 128, 4, 4),
    (64, 256, 4, 3),
    (128, 128, 4, 3),
    (32, 256, 4, 4),
    (64, 64, 4, 5),
]
SMALL_DN = [
    (32, 128, 4, 4, 1),
    (64, 128, 4, 4, 1),
    (64, 256, 4, 3, 1),
    (128, 128, 4, 3, 1),
    (64, 128, 4, 4, 2),
    (32, 256, 4, 4, 2),
]
LARGE_GU = [(64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 4, 3), (64, 64, 8, 4)]
LARGE_DN = [
    (128, 64, 8, 3, 1),
    (256, 64, 8, 3, 1),
    (128, 64, 4, 4, 1),
    (128, 128, 8, 3, 1),
    (64, 64, 4, 4, 1),
]


def block_m_candidates(tokens: int, top_k: int, experts: int) -> list[int]:
    """BLOCK_M worth trying for this mean number of rows per expert."""
    rows = tokens * top_k / experts
    if rows <= 4:
        return [16]
    if rows <= 24:
        return [16, 32]
    if rows <= 96:
        return [32, 64]
    return [64, 128]


def kernel_cfg(c, bm, down=False) -> dict:
    """Candidate tuple -> the kernel's keyword configuration."""
    d = {
        "BLOCK_N": c[0],
        "BLOCK_K": c[1],
        "num_warps": c[2],
        "num_stages": c[3],
        "GROUP_M": 1 if bm <= 32 else 8,
    }
    if down:
        d["SPLIT_K"] = c[4]
    return d


def tune_point(x, w13, w2, routings, e, k, bm):
    """Best (time us, gate_up cfg, down cfg) for one BLOCK_M, each kernel timed on its own."""
    plans = [fm.plan(ids, e, bm) for _, ids in routings]
    t, h_dim, inter = x.shape[0], x.shape[1], w2.shape[2]
    outs = [torch.empty(t, h_dim, dtype=torch.float32, device="cuda") for _ in plans]
    hs = [torch.empty(pl.max_blocks * bm, inter, dtype=x.dtype, device="cuda") for pl in plans]
    t_align = (
        0.0
        if plans[0].sorted_ids is None
        else time_fn(lambda: [fm.plan(ids, e, bm) for _, ids in routings], budget_ms=30)
    )
    small = bm <= 32
    best_gu = best_dn = (float("inf"), None)
    for c in SMALL_GU if small else LARGE_GU:
        cfg = kernel_cfg(c, bm)
        try:
            us = time_fn(
                lambda cfg=cfg: [
                    fm.gate_up(x, w13, h, o, pl, k, cfg, bm) for pl, h, o in zip(plans, hs, outs)
                ],
                budget_ms=40,
            )
        except Exception as exc:  # noqa: BLE001 -- out of shared memory or registers: not a candidate here
            print(f"  skip gate_up {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        best_gu = min(best_gu, (us, cfg), key=lambda p: p[0])
    for c in SMALL_DN if small else LARGE_DN:
        cfg = kernel_cfg(c, bm, down=True)
        try:
            us = time_fn(
                lambda cfg=cfg: [
                    fm.down(h, w2, o, pl, w, k, cfg, bm)
                    for pl, h, o, (w, _) in zip(plans, hs, outs, routings)
                ],
                budget_ms=40,
            )
        except Exception as exc:  # noqa: BLE001
            print(f"  skip down {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        best_dn = min(best_dn, (us, cfg), key=lambda p: p[0])
    total = (t_align + best_gu[0] + best_dn[0]) / ROUTINGS
    print(
        f"  BM={bm}: align {t_align / ROUTINGS:.1f} gate_up {best_gu[0] / ROUTINGS:.1f} "
        f"down {best_dn[0] / ROUTINGS:.1f} us",
        flush=True,
    )
    return total, best_gu[1], best_dn[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="v2lite,v3,mixtral")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--out", default=str(fm.CONFIG_DIR))
    args = p.parse_args()
    device = torch.cuda.get_device_name()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.shapes.split(","):
        e, h, i, k = SHAPES[name]
        w13, w2 = make_layer(e, h, i)
        path = out_dir / fm.config_file_name(e, h, i, "bf16", device)
        table = json.loads(path.read_text()) if path.exists() else {}
        for t in [int(s) for s in args.tokens.split(",")]:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            routings = [make_routing(t, e, k, seed) for seed in range(ROUTINGS)]
            best = None
            for bm in block_m_candidates(t, k, e):
                try:
                    res = tune_point(x, w13, w2, routings, e, k, bm)
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} T={t} BM={bm}: {exc!r}", file=sys.stderr)
                    continue
                if res[1] and res[2] and (best is None or res[0] < best[0]):
                    best = (res[0], bm, res[1], res[2])
            if best:
                table[str(t)] = {"BLOCK_M": best[1], "gate_up": best[2], "down": best[3]}
                print(f"{name} T={t}: {best[0]:.1f} us {table[str(t)]}", flush=True)
                path.write_text(
                    json.dumps(dict(sorted(table.items(), key=lambda kv: int(kv[0]))), indent=1) + "\n"
                )
        del w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
