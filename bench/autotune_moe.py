"""Tune the fused MoE kernels' block sizes per shape and token count on this GPU, and write them
as JSON (kernels/configs/E<e>_H<h>_I<i>_bf16_<GPU>.json), read by
`kernels.fused_moe.get_config`.

    python bench/autotune_moe.py [--shapes v2lite,v3,mixtral] [--tokens 1,4,...] [--out DIR]

For each token count and each candidate BLOCK_M (shared by both GEMMs and the alignment), the
gate/up and the down kernels are timed apart over their own candidates; the fastest sum wins,
once the whole layer with it matches a torch computation. Where the layer launches down while
gate/up still runs (PDL, decode sizes), what one kernel leaves of the SMs decides how soon the
other starts, so there the best PAIR_TOP of each are timed again in pairs, as the whole layer. On
Hopper every candidate is also tried with its tiles read through TMA descriptors ("TMA": true).
Up to GEMV_TUNE_MAX_TOKENS tokens (bf16) the layer as GEMVs (`kernels.moe_gemv`) is tuned too, each
kernel's launch parameters in turn, timed as the whole layer; its entry ("GEMV": true) is written
only where it beats the grouped GEMMs. `--gemv-only` tunes just that and compares it with the
entry already in the file, leaving the GEMM entries as they are.
`--precompile N` compiles every candidate first in N processes; `--fp8` tunes the w8a8 path (files
named ..._fp8_w8a8_...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernels import (
    ROUTINGS,
    SHAPES,
    TOKENS,
    fm,
    grouped_mm_moe,
    make_layer,
    make_routing,
    precompile,
    reference,
    time_fn,
)

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
# Arithmetic-bound sizes: 64- and 128-row tiles, gate+up 2 x 64..256 columns, deeper pipelines.
# Shared memory per stage is BM*BK*2 + 2*BN*BK*2 bytes (gate/up), BM*BK*2 + BN*BK*2 (down), of
# 227 KB; candidates over it (or over the registers) fail to launch and are skipped.
LARGE_GU = [
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (128, 128, 8, 2),
    (256, 64, 8, 3),
    (64, 64, 8, 5),
    (128, 64, 4, 4),
]
LARGE_DN = [
    (128, 64, 8, 3, 1),
    (256, 64, 8, 3, 1),
    (128, 64, 4, 4, 1),
    (128, 128, 8, 3, 1),
    (256, 64, 8, 4, 1),
    (256, 128, 8, 2, 1),
    (128, 64, 8, 4, 1),
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


def _with_bk128(cs: list[dict]) -> list[dict]:
    """Candidates with BLOCK_K = 128 (the fp8 scale group), duplicates dropped."""
    return list({json.dumps(dict(c, BLOCK_K=128), sort_keys=True): dict(c, BLOCK_K=128) for c in cs}.values())


def candidates(bm: int, fp8: bool, tma: bool = False) -> tuple[list[dict], list[dict]]:
    """(gate_up, down) configurations to try at this BLOCK_M (fp8: BLOCK_K is 128 regardless);
    with `tma`, each also reading its tiles through tensor descriptors."""
    small = bm <= 32
    gu = [kernel_cfg(c, bm) for c in (SMALL_GU if small else LARGE_GU)]
    dn = [kernel_cfg(c, bm, down=True) for c in (SMALL_DN if small else LARGE_DN)]
    if fp8:  # one BLOCK_K: drop the duplicates the fixed 128 makes
        gu, dn = _with_bk128(gu), _with_bk128(dn)
    if tma:
        gu, dn = gu + [dict(c, TMA=True) for c in gu], dn + [dict(c, TMA=True) for c in dn]
    return gu, dn


def tma_capable() -> bool:
    """Whether this GPU has the tensor memory accelerator (Hopper, sm90, and later)."""
    return torch.cuda.get_device_capability()[0] >= 9


PAIR_TOP = 4  # per kernel, at the sizes timed in pairs (16 layer timings per point)
GEMV_TUNE_MAX_TOKENS = 4  # tried up to here; on the H200 it won at 1 and 2 tokens
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV kernels: thin slices of weight rows (the
# stage count moved nothing in a first sweep on the H200)
GEMV_GU = list(itertools.product((8, 16, 32), (64, 128, 256), (4, 8), (3,)))
GEMV_DN = list(itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3,)))


def _gemv_kernel_cfg(c) -> dict:
    return dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), c))


def layer_us(x, w13, w2, routings, config) -> float:
    """The layer's time with `config` (inf for None)."""
    if config is None:
        return float("inf")
    return time_fn(lambda: [fm.fused_moe(x, w13, w2, w, ids, config=config) for w, ids in routings],
                   budget_ms=30) / ROUTINGS


def tune_gemv(x, w13, w2, routings) -> tuple[float, dict]:
    """(layer us, config) of the layer as GEMVs: gate/up's parameters with down at the default,
    then down's with the best gate/up, every candidate timed as the whole layer."""
    config = fm.gemv_default()
    best = layer_us(x, w13, w2, routings, config)
    for part, cands in (("gate_up", GEMV_GU), ("down", GEMV_DN)):
        for c in cands:
            trial = dict(config, **{part: _gemv_kernel_cfg(c)})
            try:
                us = layer_us(x, w13, w2, routings, trial)
            except Exception as exc:  # noqa: BLE001 -- out of registers: not a candidate here
                print(f"  skip gemv {part} {c}: {type(exc).__name__}", file=sys.stderr)
                continue
            if us < best:
                best, config = us, trial
    print(f"  GEMV: {best:.1f} us {config}", flush=True)
    return best, config


def grouped_entry(table: dict, tokens: int) -> dict | None:
    """The grouped-GEMM entry the table gives `tokens` with its GEMV entries left out (the nearest,
    as `kernels.fused_moe.nearest_entry` picks): what a GEMV entry must beat."""
    return fm.nearest_entry({int(t): c for t, c in table.items() if not c.get("GEMV")}, tokens)


def tune_point(x, w13, w2, routings, e, k, bm, scales):
    """Best (time us, gate_up cfg, down cfg) for one BLOCK_M, each kernel timed on its own, then,
    where the layer chains them (PDL), the best of each in pairs (`best_pair`). Both are timed as
    the layer runs them: down with the fused final cast where it applies, and fp8 on activations
    quantized beforehand where the layer does that (its launches counted)."""
    plans = [fm.plan(ids, e, bm) for _, ids in routings]
    t, h_dim, inter = x.shape[0], x.shape[1], w2.shape[2]
    work = [fm.workspace(t, h_dim, "cuda") for _ in plans]
    outs = [buf[: t * h_dim].view(t, h_dim) for buf, _ in work]
    fused = fm.casts_in_down(x)
    finals = [torch.empty_like(x) if fused else None for _ in plans]
    hs = [torch.empty(pl.max_blocks * bm, inter, dtype=x.dtype, device="cuda") for pl in plans]
    s13, s2 = scales.get("w13_scale"), scales.get("w2_scale")
    t_align = (
        0.0
        if plans[0].sorted_ids is None
        else time_fn(lambda: [fm.plan(ids, e, bm) for _, ids in routings], budget_ms=30)
    )
    # Both GEMMs read the activations as the layer gives them: quantized by launches of their own where it does
    x_in, x_scale, h_in, h_scales = x, None, hs, [None] * len(hs)
    if fm.quantizes_once(bool(scales), t * k):
        t_align += time_fn(lambda: [(fm.quant_activations(x), fm.quant_activations(h)) for h in hs], budget_ms=30)
        x_in, x_scale = fm.quant_activations(x)
        h_in, h_scales = zip(*(fm.quant_activations(h) for h in hs))
    gu_cands, dn_cands = candidates(bm, bool(scales), tma_capable())
    gu_times, dn_times = [], []
    for cfg in gu_cands:
        try:
            us = time_fn(
                lambda cfg=cfg: [
                    fm.gate_up(x_in, w13, h, buf, pl, k, cfg, bm, s13, x_scale=x_scale)
                    for pl, h, (buf, _) in zip(plans, hs, work)
                ],
                budget_ms=40,
            )
        except Exception as exc:  # noqa: BLE001 -- out of shared memory or registers: not a candidate here
            print(f"  skip gate_up {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        gu_times.append((us, cfg))
    for cfg in dn_cands:
        try:
            us = time_fn(
                lambda cfg=cfg: [
                    fm.down(h, w2, o, pl, w, k, cfg, bm, s2, final=f, counters=cnt if fused else None, h_scale=sc)
                    for pl, h, sc, o, f, (_, cnt), (w, _) in zip(plans, h_in, h_scales, outs, finals, work, routings)
                ],
                budget_ms=40,
            )
        except Exception as exc:  # noqa: BLE001
            print(f"  skip down {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        dn_times.append((us, cfg))
    if not gu_times or not dn_times:
        return float("inf"), None, None
    gu_times.sort(key=lambda p: p[0])
    dn_times.sort(key=lambda p: p[0])
    (us_gu, best_gu), (us_dn, best_dn) = gu_times[0], dn_times[0]
    total = (t_align + us_gu + us_dn) / ROUTINGS
    print(
        f"  BM={bm}: align (+ fp8 quantization) {t_align / ROUTINGS:.1f} gate_up {us_gu / ROUTINGS:.1f} "
        f"down {us_dn / ROUTINGS:.1f} us {best_gu} {best_dn}",
        flush=True,
    )
    if chained(t, k, bool(scales)):
        total, best_gu, best_dn = best_pair(x, w13, w2, routings, bm, scales, gu_times, dn_times)
    return total, best_gu, best_dn


def chained(tokens: int, top_k: int, fp8: bool) -> bool:
    """Whether the layer launches down while gate/up still runs at this size."""
    return fm.launches_down_early(torch.empty(tokens, 1, dtype=torch.bfloat16, device="cuda"), top_k, fp8)


def best_pair(x, w13, w2, routings, bm, scales, gu_times, dn_times):
    """(layer us, gate_up cfg, down cfg): the fastest of the PAIR_TOP x PAIR_TOP best-alone
    candidates, each pair timed as the whole layer (so with down launched during gate/up)."""
    timed = []
    for (_, gu), (_, dn) in itertools.product(gu_times[:PAIR_TOP], dn_times[:PAIR_TOP]):
        config = {"BLOCK_M": bm, "gate_up": gu, "down": dn}
        us = time_fn(lambda config=config: [fm.fused_moe(x, w13, w2, w, ids, config=config, **scales)
                                            for w, ids in routings], budget_ms=40)
        timed.append((us / ROUTINGS, gu, dn))
    best = min(timed, key=lambda p: p[0])
    print(f"  BM={bm}: best of {len(timed)} pairs as the layer {best[0]:.1f} us {best[1]} {best[2]}", flush=True)
    return best


def layer_error(x, w13, w2, routing, config, scales) -> float:
    """Relative error of the whole layer with `config` against a torch computation."""
    w, ids = routing
    out = fm.fused_moe(x, w13, w2, w, ids, config=config, **scales).float()
    if scales:
        ref = reference.fused_moe_fp8(x, w13, w2, w, ids, scales["w13_scale"], scales["w2_scale"]).float()
    else:
        try:
            ref = grouped_mm_moe(x, w13, w2, w, ids).float()
        except Exception:  # noqa: BLE001 -- no torch._grouped_mm here: the per-expert loop
            ref = reference.fused_moe(x, w13, w2, w, ids).float()
    return ((out - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else float("inf")


def record_device(out_dir: Path, device: str) -> None:
    """Note this GPU's compute capability beside its files: GPUs of the same architecture fall
    back to them (kernels.fused_moe.get_config)."""
    path = out_dir / fm.DEVICES_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    known[device] = list(torch.cuda.get_device_capability())
    path.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="v2lite,v3,mixtral")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--out", default=str(fm.CONFIG_DIR))
    p.add_argument("--fp8", action="store_true", help="tune the fp8 w8a8 path instead of bf16")
    p.add_argument("--precompile", type=int, default=0, help="compile all candidates first in N processes")
    p.add_argument("--gemv-only", action="store_true",
                   help="tune only the GEMV layer, against the entries already in the file")
    args = p.parse_args()
    device = torch.cuda.get_device_name()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    tokens = [int(s) for s in args.tokens.split(",")]
    tasks = []
    for name in shapes if not args.gemv_only else ():
        e, h, i, k = SHAPES[name]
        for t in tokens:
            for bm in block_m_candidates(t, k, e):
                gu, dn = candidates(bm, args.fp8, tma_capable())
                base = {"shape": name, "tokens": t, "bm": bm, "fp8": args.fp8}
                # the PDL variants too where the layer chains the two (timed as pairs, see best_pair)
                pdl = [False, True] if chained(t, k, args.fp8) else [False]
                tasks += [dict(base, kind="gate_up", cfg=c, pdl=p) for c in gu for p in pdl]
                tasks += [dict(base, kind="down", cfg=c, pdl=p) for c in dn for p in pdl]
    precompile(tasks, args.precompile)
    record_device(out_dir, device)
    tag = "fp8_w8a8" if args.fp8 else "bf16"
    for name in shapes:
        e, h, i, k = SHAPES[name]
        w13, w2 = make_layer(e, h, i)
        scales = {}
        if args.fp8:
            w13, s13 = reference.quant_fp8_blocks(w13)
            w2, s2 = reference.quant_fp8_blocks(w2)
            scales = {"w13_scale": s13, "w2_scale": s2}
        path = out_dir / fm.config_file_name(e, h, i, tag, device)
        table = json.loads(path.read_text()) if path.exists() else {}
        for t in tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            routings = [make_routing(t, e, k, seed) for seed in range(ROUTINGS)]
            results = []
            if args.gemv_only:
                existing = grouped_entry(table, t)
                results.append((layer_us(x, w13, w2, routings, existing), existing))
                print(f"{name} T={t}: the file's grouped-GEMM entry for it {results[0][0]:.1f} us", flush=True)
            if t <= GEMV_TUNE_MAX_TOKENS and not args.fp8:
                results.append(tune_gemv(x, w13, w2, routings))
            for bm in block_m_candidates(t, k, e) if not args.gemv_only else ():
                try:
                    us, gu, dn = tune_point(x, w13, w2, routings, e, k, bm, scales)
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} T={t} BM={bm}: {exc!r}", file=sys.stderr)
                    continue
                if gu and dn:
                    results.append((us, {"BLOCK_M": bm, "gate_up": gu, "down": dn}))
            # fastest first; a choice whose layer output disagrees with torch is never written
            chosen = None
            for us, config in sorted(results, key=lambda r: r[0]):
                if config is None:
                    continue
                err = layer_error(x, w13, w2, routings[0], config, scales)
                if err < (3e-2 if args.fp8 else 1e-2):
                    chosen = (us, config)
                    break
                print(f"{name} T={t}: rejected {config}: error {err:.3g}", file=sys.stderr)
            if chosen and args.gemv_only and not chosen[1].get("GEMV"):
                # the grouped GEMMs stay: drop a GEMV entry an earlier run left here, add nothing
                if table.get(str(t), {}).get("GEMV"):
                    del table[str(t)]
                print(f"{name} T={t}: the grouped GEMMs stay ({chosen[0]:.1f} us)", flush=True)
            elif chosen:
                table[str(t)] = chosen[1]
                print(f"{name} T={t}: {chosen[0]:.1f} us {chosen[1]}", flush=True)
            if chosen:
                path.write_text(
                    json.dumps(dict(sorted(table.items(), key=lambda kv: int(kv[0]))), indent=1) + "\n"
                )
        del w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
