"""Fused MoE experts in Triton: align and sort the routed (token, slot) pairs by expert, a grouped
GEMM for the gate and up projections with SwiGLU fused in, and a grouped GEMM for the down
projection that applies the top-k weight and sums into an fp32 buffer (atomics); at few tokens its
last program per column tile also writes the output in x's dtype (no cast launch). bf16/fp16/fp32,
and DeepSeek-V3's w8a8 fp8 with 128x128 weight block scales (activations quantized per token per
128 columns: inside the GEMMs at decode sizes, else once by a launch of their own before each GEMM).
At one or two tokens a tuned config may ask for `kernels.moe_gemv` instead (`"GEMV": true`).
Reference: `kernels.reference.fused_moe` / `fused_moe_fp8`.

Layout (as vLLM's fused MoE): slot s = token * top_k + j; `sorted_ids` lists the slots expert by
expert, each expert's run padded to a multiple of BLOCK_M with the sentinel T*top_k;
`block_expert[b]` is the expert of block b, -1 past the last block, so a grid sized from the
shapes alone (capturable in a CUDA graph) can skip the blocks it does not need.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import moe_gemv
from kernels.workspace import ZERO_BLOCK, workspace, zero_program_share, zero_share

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.3 on Hopper
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

CONFIG_DIR = Path(__file__).parent / "configs"
FP8_MAX = 448.0
FP8_EPS = 1e-10
FP8_BLOCK = 128
ALIGN_CHUNK = 1024
TINY_MAX = 64  # up to this many slots, each GEMM program aligns its own rows (no align launch)
# Up to this many tokens the down kernel's last program per column tile writes the cast output
# (no cast launch). Above it that one program's serial pass over the tile's column of all tokens
# is a tail longer than the launch it saves (H100, 2026-11-23: +6..10 us at 256 tokens on two of
# three shapes, +30..50 us at 1024; -0.5..4 us at 1..64 tokens).
FUSED_CAST_MAX_TOKENS = 64
CAST_TILE = 8192  # elements per step of that pass
# fp8: from this many slots up, x and h are quantized once each by `quant_activations` rather than
# by every GEMM program that reads them (each row block of x is read by all I/BLOCK_N gate/up
# column tiles, each of h by all H/BLOCK_N down tiles). Below it the GEMMs quantize their own tiles:
# the extra launches would cost more than the repeated quantization of a few rows.
PREQUANT_MIN_SLOTS = TINY_MAX + 1
QUANT_ROWS = 32  # rows per program of the quantization launch
# Where no tuned file exists, layers of at most this many tokens run as GEMVs (`kernels.moe_gemv`),
# bf16/fp16/fp32 only: on the H200 they beat the grouped GEMMs at 1 and 2 tokens, not at 4.
GEMV_MAX_TOKENS = 2
GEMV_DEFAULT = {
    "GEMV": True,
    "gate_up": {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    "down": {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
}


# --------------------------------------------------------------------------------------------
# Align: sort slots by expert, pad each expert's run to BLOCK_M.
# --------------------------------------------------------------------------------------------


@triton.jit
def _plan_blocks(
    counts, sorted_ptr, block_expert_ptr, max_blocks, TK, BLOCK_M: tl.constexpr, BB: tl.constexpr
):
    """From per-expert counts: write block -> expert and the pad sentinels; return each
    expert's first position in `sorted_ids`."""
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    block_start = block_end - blocks
    total = tl.sum(blocks, axis=0)
    for b0 in range(0, max_blocks, BB):
        b = b0 + tl.arange(0, BB)
        # the expert of block b is the number of experts whose blocks all end at or before b
        e_of_b = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(b < total, e_of_b, -1), mask=b < max_blocks)
    pad_pos = (block_start * BLOCK_M + counts)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    pad_mask = pad_pos < (block_end * BLOCK_M)[:, None]
    tl.store(sorted_ptr + pad_pos, tl.zeros_like(pad_pos) + TK, mask=pad_mask)
    return block_start * BLOCK_M


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, TK, E, CHUNK: tl.constexpr):
    """Expert histogram of one chunk of slots, by atomics."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < TK, other=-1).to(tl.int32)
    ok = (offs < TK) & (ids >= 0) & (ids < E)
    tl.atomic_add(counts_ptr + ids, tl.full([CHUNK], 1, tl.int32), mask=ok, sem="relaxed")


@triton.jit
def _align_plan_kernel(
    counts_ptr,
    cursor_ptr,
    sorted_ptr,
    block_expert_ptr,
    TK,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    BB: tl.constexpr,
):
    """Blocks and pads from the histogram; each expert's first free position into `cursor`."""
    e = tl.arange(0, E_PAD)
    base = _plan_blocks(tl.load(counts_ptr + e), sorted_ptr, block_expert_ptr, max_blocks, TK, BLOCK_M, BB)
    tl.store(cursor_ptr + e, base)


@triton.jit
def _align_scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, TK, E, CHUNK: tl.constexpr):
    """Each slot takes the next free position of its expert (atomics): the order inside an
    expert's run is arbitrary, which no row's result depends on."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < TK, other=-1).to(tl.int32)
    ok = (offs < TK) & (ids >= 0) & (ids < E)
    pos = tl.atomic_add(cursor_ptr + ids, tl.full([CHUNK], 1, tl.int32), mask=ok, sem="relaxed")
    tl.store(sorted_ptr + pos, offs, mask=ok)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_ids int32 [max_blocks * block_m], block_expert int32 [max_blocks]); sizes depend
    on shapes only, so this is capturable in a CUDA graph. Four short launches (memset, count,
    plan, scatter), parallel over the slots."""
    ids = topk_ids.reshape(-1)
    tk = ids.numel()
    max_blocks = triton.cdiv(tk, block_m) + min(num_experts, tk)
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    e_pad = triton.next_power_of_2(num_experts)
    counts = torch.zeros(2, e_pad, dtype=torch.int32, device=ids.device)  # histogram, cursor
    grid = (triton.cdiv(tk, ALIGN_CHUNK),)
    _align_count_kernel[grid](ids, counts[0], tk, num_experts, CHUNK=ALIGN_CHUNK)
    _align_plan_kernel[(1,)](
        counts[0],
        counts[1],
        sorted_ids,
        block_expert,
        tk,
        max_blocks,
        BLOCK_M=block_m,
        E_PAD=e_pad,
        BB=max(16, min(256, 8192 // e_pad)),
        num_warps=4,
    )
    _align_scatter_kernel[grid](ids, counts[1], sorted_ids, tk, num_experts, CHUNK=ALIGN_CHUNK)
    return sorted_ids, block_expert


# --------------------------------------------------------------------------------------------
# Grouped GEMMs.
# --------------------------------------------------------------------------------------------


@triton.jit
def _tiny_plan(ids_ptr, pid_m, TK, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, TK_PAD: tl.constexpr):
    """The alignment of a few slots (decode), recomputed by every GEMM program for its own row
    block instead of by a separate launch: (expert or -1, slot per row or TK for pads)."""
    s = tl.arange(0, TK_PAD)
    ids = tl.load(ids_ptr + s, mask=s < TK, other=-1).to(tl.int32)
    ids = tl.where(ids < E, ids, -1)
    onehot = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    counts = tl.sum(onehot, axis=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    block_start = block_end - blocks
    expert = tl.sum((block_end <= pid_m).to(tl.int32), axis=0)
    expert = tl.where(pid_m < tl.sum(blocks, axis=0), expert, -1)
    rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
    pos = tl.sum(onehot * block_start[None, :], axis=1) * BLOCK_M + rank
    pos = tl.where(tl.sum(onehot, axis=1) > 0, pos, -1)
    eq = pos[None, :] == (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    slot = tl.sum(tl.where(eq, s[None, :], 0), axis=1)
    slot = tl.where(tl.sum(eq.to(tl.int32), axis=1) > 0, slot, TK)
    return expert, slot


@triton.jit
def _block_rows(
    ids_ptr,
    sorted_ptr,
    block_expert_ptr,
    pid_m,
    TK,
    E,
    BLOCK_M: tl.constexpr,
    TINY: tl.constexpr,
    E_PAD: tl.constexpr,
    TK_PAD: tl.constexpr,
):
    """(expert, slots) of row block pid_m: from the alignment's output, or computed (TINY)."""
    if TINY:
        expert, slot = _tiny_plan(ids_ptr, pid_m, TK, E, BLOCK_M, E_PAD, TK_PAD)
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, slot


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering (Triton matmul tutorial): GROUP_M blocks of rows share each weight tile
    while it is still in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b; UPCAST under Triton's interpreter, whose low-precision dot is wrong
    (triton 3.9: bf16 operands give garbage)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _quant_rows(a, UPCAST: tl.constexpr):
    """Per-row fp8 e4m3 quantization of one [BM, 128] activation tile: (fp8 tile, scales [BM]).
    UPCAST (the interpreter, whose fp32->fp8 cast can be off by a binade) rounds in fp32 math
    instead, to the same e4m3 grid, half away from zero rather than to even."""
    a = a.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10) / 448.0
    v = a / scale[:, None]
    if UPCAST:
        mag = tl.abs(v)
        # e4m3: 3 mantissa bits; below 2**-6 the subnormal spacing 2**-9 holds
        step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(mag, 1e-30))), -6.0) - 3.0)
        q = tl.where(v < 0, -1.0, 1.0) * tl.floor(mag / step + 0.5) * step
        return q, scale
    return v.to(tl.float8e4nv), scale


@triton.jit
def _quant_act_kernel(a_ptr, q_ptr, s_ptr, M, K, stride_am, stride_qm, stride_sm, BLOCK_M: tl.constexpr,
                      GROUP: tl.constexpr, UPCAST: tl.constexpr):
    """One [BLOCK_M, GROUP] tile of `_quant_rows` over a [M, K] activation: e4m3 values into q, one
    scale per row into column pid(1) of s."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    r64 = rows[:, None].to(tl.int64)
    a = tl.load(a_ptr + r64 * stride_am + cols[None, :], mask=ok, other=0.0)
    q, scale = _quant_rows(a, UPCAST)
    tl.store(q_ptr + r64 * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + rows * stride_sm + group, scale, mask=rows < M)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    ws_ptr,
    h_ptr,
    zero_ptr,
    sorted_ptr,
    block_expert_ptr,
    ids_ptr,
    TK,
    TOP_K,
    E,
    H,
    I,
    num_pid_m,
    n_zero,
    zero_per_prog,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_hm,
    xs_ptr,
    stride_xsm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP8: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    TINY: tl.constexpr,
    E_PAD: tl.constexpr,
    TK_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
    TMA: tl.constexpr = False,
    A_FP8: tl.constexpr = False,
):
    """h[p] = silu(x[tok] @ Wg[e].T) * (x[tok] @ Wu[e].T) for sorted position p of expert e.
    PDL: the down kernel may launch as soon as every program here has started.
    TMA: `w_ptr` is a tensor descriptor over w13 as [E * 2I, H] with [BLOCK_N, BLOCK_K] tiles (the
    x rows are gathered, which Hopper's TMA cannot do, so they stay pointer loads).
    A_FP8 (with FP8): x is already quantized (e4m3, its scales [T, H / 128] at `xs_ptr`)."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    # this program's share of the fp32 output (and counters) the down kernel adds into
    zero_program_share(zero_ptr, n_zero, zero_per_prog, ZERO_BLOCK)

    pid_m, pid_n = _tile_ids(pid, num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, slot = _block_rows(
        ids_ptr, sorted_ptr, block_expert_ptr, pid_m, TK, E, BLOCK_M, TINY, E_PAD, TK_PAD
    )
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = slot < TK
    tok = tl.where(valid, slot // TOP_K, 0)  # pad rows read token 0 and are never stored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % I  # wrap instead of masking the weight loads; the store masks
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    if TMA:
        # A tile past column I reads the up rows (or the next expert's): those columns are not stored.
        g_row = expert * (2 * I) + pid_n * BLOCK_N
    else:
        g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + I * stride_wn
    if FP8:
        gs_ptrs = ws_ptr + expert * stride_se + (cols // BLOCK_K) * stride_sn
        us_ptrs = ws_ptr + expert * stride_se + ((cols + I) // BLOCK_K) * stride_sn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(tl.cdiv(H, BLOCK_K)):
        if TMA:
            # the descriptor zero-fills columns past H, so a ragged last K step needs no mask on w
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(offs_k < H - kb * BLOCK_K)[None, :], other=0.0)
            g = w_ptr.load([g_row, kb * BLOCK_K]).T
            u = w_ptr.load([g_row + I, kb * BLOCK_K]).T
        elif EVEN_K:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < H - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:
            if A_FP8:
                aq, a_s = a, tl.load(xs_ptr + tok * stride_xsm + kb)
            else:
                aq, a_s = _quant_rows(a, UPCAST)
            zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_g += _dot(aq, g, zero, UPCAST) * (a_s[:, None] * tl.load(gs_ptrs + kb)[None, :])
            acc_u += _dot(aq, u, zero, UPCAST) * (a_s[:, None] * tl.load(us_ptrs + kb)[None, :])
        else:
            acc_g = _dot(a, g, acc_g, UPCAST)
            acc_u = _dot(a, u, acc_u, UPCAST)
        a_ptrs += BLOCK_K
        if not TMA:
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < I))


@triton.jit
def _down_kernel(
    h_ptr,
    w_ptr,
    ws_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    ids_ptr,
    topk_w_ptr,
    cnt_ptr,
    final_ptr,
    TK,
    TOP_K,
    E,
    H,
    I,
    T,
    num_pid_m,
    k_per_split,
    n_contrib,
    stride_hm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    stride_fm,
    hs_ptr,
    stride_hsm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP8: tl.constexpr,
    UPCAST: tl.constexpr,
    TINY: tl.constexpr,
    E_PAD: tl.constexpr,
    TK_PAD: tl.constexpr,
    FUSED_CAST: tl.constexpr,
    CAST_M: tl.constexpr,
    PDL: tl.constexpr = False,
    TMA: tl.constexpr = False,
    A_FP8: tl.constexpr = False,
):
    """out[tok] += w_slot * (h[p] @ W2[e].T) over this program's K range, in fp32 atomics.
    FUSED_CAST: the last of the `n_contrib` programs of a column tile (every program counts,
    idle ones too) writes that tile's final values, cast, to `final` (no cast launch).
    PDL: launched while gate/up still runs; the rows come from the routing alone, so they are
    worked out before waiting for gate/up's h (and its zeroing of `out` and the counters).
    TMA: `h_ptr` and `w_ptr` are tensor descriptors (h as [rows, I] in [BLOCK_M, BLOCK_K] tiles, w2
    as [E * H, I] in [BLOCK_N, BLOCK_K] tiles).
    A_FP8 (with FP8): h is already quantized (e4m3, its scales [rows, I / 128] at `hs_ptr`)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert, slot = _block_rows(
        ids_ptr, sorted_ptr, block_expert_ptr, pid_m, TK, E, BLOCK_M, TINY, E_PAD, TK_PAD
    )
    if PDL:
        gdc_wait()
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if expert >= 0:
        _down_tile(
            h_ptr,
            w_ptr,
            ws_ptr,
            out_ptr,
            topk_w_ptr,
            expert,
            slot,
            pid_m,
            offs_n,
            pid_n * BLOCK_N,
            TK,
            TOP_K,
            H,
            I,
            k_per_split,
            stride_hm,
            stride_we,
            stride_wn,
            stride_se,
            stride_sn,
            stride_om,
            hs_ptr,
            stride_hsm,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
            FP8,
            UPCAST,
            TMA,
            A_FP8,
        )
    if FUSED_CAST:
        # Split-K semaphore pattern: the barrier orders every thread's atomics before the
        # counter's release; the counter's acquire orders the read-back after all of them.
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == n_contrib - 1:
            tl.debug_barrier()
            n_ok = offs_n < H
            for t0 in range(0, T, CAST_M):
                rows = t0 + tl.arange(0, CAST_M)
                m = (rows < T)[:, None] & n_ok[None, :]
                r64 = rows[:, None].to(tl.int64)
                # .cg: from L2, where the atomics landed, never a stale L1 line
                v = tl.load(out_ptr + r64 * stride_om + offs_n[None, :], mask=m, cache_modifier=".cg")
                tl.store(
                    final_ptr + r64 * stride_fm + offs_n[None, :], v.to(final_ptr.dtype.element_ty), mask=m
                )
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")  # ready for the next call


@triton.jit
def _down_tile(
    h_ptr,
    w_ptr,
    ws_ptr,
    out_ptr,
    topk_w_ptr,
    expert,
    slot,
    pid_m,
    offs_n,
    n0,
    TK,
    TOP_K,
    H,
    I,
    k_per_split,
    stride_hm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    hs_ptr,
    stride_hsm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP8: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
    A_FP8: tl.constexpr,
):
    """One (row block, column tile, K range) of the down GEMM, added into out by atomics.
    With TMA the pad rows of h are read too (never written, so any bits): a product's row depends
    on its own row of h alone, and pad rows are masked out of the sums."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = slot < TK
    slot = tl.where(valid, slot, 0)
    cols = offs_n % H
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, I)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    if not TMA:
        a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
        b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + offs_k[:, None]
    if FP8:
        bs_ptrs = ws_ptr + expert * stride_se + (cols // BLOCK_K) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if TMA:
            # K ranges are whole BLOCK_K steps up to I, where the descriptors zero-fill: no masks
            a = h_ptr.load([pid_m * BLOCK_M, k])
            b = w_ptr.load([expert * H + n0, k]).T
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = tl.arange(0, BLOCK_K) < k_hi - k
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:
            if A_FP8:
                aq, a_s = a, tl.load(hs_ptr + offs_m * stride_hsm + k // BLOCK_K)
            else:
                aq, a_s = _quant_rows(a, UPCAST)
            zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc += _dot(aq, b, zero, UPCAST) * (a_s[:, None] * tl.load(bs_ptrs + k // BLOCK_K)[None, :])
        else:
            acc = _dot(a, b, acc, UPCAST)
        if not TMA:
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    acc *= tl.load(topk_w_ptr + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + (slot // TOP_K)[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.atomic_add(out_ptrs, acc, mask=valid[:, None] & (offs_n[None, :] < H), sem="relaxed")


# --------------------------------------------------------------------------------------------
# Tuned launch configurations (data, per GPU and shape) and the launcher.
# --------------------------------------------------------------------------------------------


def config_file_name(num_experts: int, hidden: int, inter: int, dtype: str, device: str) -> str:
    """JSON file name for one shape on one GPU, e.g. E64_H2048_I1408_bf16_NVIDIA_H100_80GB_HBM3.json."""
    gpu = re.sub(r"[^A-Za-z0-9.-]+", "_", device)
    return f"E{num_experts}_H{hidden}_I{inter}_{dtype}_{gpu}.json"


def gemv_default() -> dict:
    """A copy of GEMV_DEFAULT, the callers' to change."""
    return copy.deepcopy(GEMV_DEFAULT)


def default_config(tokens: int, top_k: int, num_experts: int, fp8: bool = False) -> dict:
    """Heuristic configuration where no tuned file exists."""
    if tokens <= GEMV_MAX_TOKENS and not fp8:
        return gemv_default()
    rows = tokens * top_k / max(1, num_experts)  # mean rows per expert
    bk = 128 if fp8 else 64
    if rows <= 16:
        bm, bn, warps, stages = 16, 64, 4, 4
        bk = 128
    elif rows <= 64:
        bm, bn, warps, stages = 64, 64, 4, 4
    else:
        bm, bn, warps, stages = 64, 128, 8, 3
    kernel = {
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": 1 if rows <= 64 else 8,
        "num_warps": warps,
        "num_stages": stages,
    }
    return {"BLOCK_M": bm, "gate_up": dict(kernel), "down": dict(kernel, SPLIT_K=1)}


@functools.cache
def _tuned(name: str) -> dict[int, dict] | None:
    """The tuned configurations of one JSON file, keyed by token count, or None."""
    path = Path(os.environ.get("MERIDIAN_MOE_CONFIG_DIR", CONFIG_DIR)) / name
    if not path.exists():
        return None
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def dtype_tag(x: torch.Tensor, fp8: bool) -> str:
    """Short dtype name used in config file names."""
    return "fp8_w8a8" if fp8 else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x.dtype, "fp32")


DEVICES_FILE = "devices.json"  # tuned GPU name -> [major, minor] compute capability


@functools.cache
def _devices_like(device: str, capability: tuple[int, int]) -> list[str]:
    """`device` first, then the other tuned GPUs of the same compute capability: an H200 runs
    the H100's tiles (the same SMs; only the memory differs) until it has tuned files of its own."""
    path = Path(os.environ.get("MERIDIAN_MOE_CONFIG_DIR", CONFIG_DIR)) / DEVICES_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    return [device] + sorted(name for name, cap in known.items() if tuple(cap) == capability and name != device)


def nearest_entry(table: dict[int, dict], tokens: int) -> dict | None:
    """The entry of a tuned table for `tokens`: the nearest token count's. A GEMV entry serves only
    token counts up to its own: it was faster there, and is slower a little further up."""
    usable = [t for t, c in table.items() if not c.get("GEMV") or tokens <= t]
    return table[min(usable, key=lambda t: abs(t - tokens))] if usable else None


def get_config(x: torch.Tensor, w13: torch.Tensor, top_k: int, fp8: bool = False) -> dict:
    """Tuned configuration for this shape on this GPU, or on a GPU of the same architecture
    (`nearest_entry`), else the default."""
    tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    devices = ["cpu"]
    if x.is_cuda:
        devices = _devices_like(torch.cuda.get_device_name(x.device), torch.cuda.get_device_capability(x.device))
    for device in devices:
        entry = nearest_entry(_tuned(config_file_name(num_experts, hidden, inter, dtype_tag(x, fp8), device)) or {},
                              tokens)
        if entry:
            return entry
    return default_config(tokens, top_k, num_experts, fp8)


def _interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Plan(NamedTuple):
    """Where each row block's slots are: the alignment's output, or (tiny) the routed ids
    themselves, aligned inside each GEMM program."""

    sorted_ids: torch.Tensor | None
    block_expert: torch.Tensor | None
    topk_ids: torch.Tensor
    num_experts: int
    max_blocks: int

    def kernel_args(self) -> tuple:
        """Pointer arguments (sorted, block_expert, ids) for the GEMM kernels."""
        ids = self.topk_ids
        return (
            ids if self.sorted_ids is None else self.sorted_ids,
            ids if self.block_expert is None else self.block_expert,
            ids,
        )

    def constexprs(self) -> dict:
        """TINY, E_PAD, TK_PAD for the GEMM kernels (the pads only matter when TINY: fixed
        otherwise, so one compiled kernel serves every shape and token count)."""
        tiny = self.sorted_ids is None
        return {
            "TINY": tiny,
            "E_PAD": triton.next_power_of_2(self.num_experts) if tiny else 16,
            "TK_PAD": max(16, triton.next_power_of_2(self.topk_ids.numel())) if tiny else 16,
        }


def plan(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Plan:
    """Align the slots by expert: inside the GEMMs for a few slots, else by `align_by_expert`."""
    tk = topk_ids.numel()
    max_blocks = triton.cdiv(tk, block_m) + min(num_experts, tk)
    ids = topk_ids.reshape(-1)
    if tk <= TINY_MAX:
        return Plan(None, None, ids, num_experts, max_blocks)
    sorted_ids, block_expert = align_by_expert(ids, num_experts, block_m)
    return Plan(sorted_ids, block_expert, ids, num_experts, max_blocks)


# Programmatic dependent launch between the two GEMMs at decode sizes, where their launch and
# ramp-up are a large share of the layer; a module switch so benchmarks can time it off.
PDL = True


@functools.cache
def _pdl_capable(device: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(x: torch.Tensor, fused_cast: bool) -> bool:
    """Whether this call's down kernel launches while gate/up still runs."""
    return PDL and fused_cast and x.is_cuda and not _interpreted() and _pdl_capable(x.device.index or 0)


def casts_in_down(x: torch.Tensor) -> bool:
    """Whether the down kernel writes the layer's output in x's dtype itself (no cast launch)."""
    return x.dtype != torch.float32 and x.shape[0] <= FUSED_CAST_MAX_TOKENS


def launches_down_early(x: torch.Tensor, top_k: int, fp8: bool = False) -> bool:
    """Whether a layer call on `x` launches down while gate/up still runs (PDL): where down casts
    the output itself, unless fp8 quantizes h between the two."""
    return use_pdl(x, casts_in_down(x)) and not quantizes_once(fp8, x.shape[0] * top_k)


def _tiles(t: torch.Tensor, block: list[int]) -> TensorDescriptor | None:
    """A TMA descriptor over the 2-D tensor `t` in `block` tiles, or None where TMA cannot read
    it (strides or base not 16-byte aligned)."""
    if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block)


def quantizes_once(fp8: bool, slots: int) -> bool:
    """Whether a layer call of `slots` routed slots quantizes x and h by `quant_activations` before
    its GEMMs (fp8 from PREQUANT_MIN_SLOTS slots), rather than in every GEMM program."""
    return fp8 and slots >= PREQUANT_MIN_SLOTS


def quant_activations(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values [M, K], fp32 scales [M, ceil(K / 128)]): `a` quantized per row per 128 columns,
    as the GEMMs would do it tile by tile (`reference.quant_fp8_rows`). Under the interpreter, whose
    fp32 -> fp8 cast is unreliable, the values are held in bf16, which represents every e4m3 value."""
    m, k = a.shape
    groups = triton.cdiv(k, FP8_BLOCK)
    q = torch.empty(m, k, dtype=torch.bfloat16 if _interpreted() else torch.float8_e4m3fn, device=a.device)
    scales = torch.empty(m, groups, dtype=torch.float32, device=a.device)
    if m:
        _quant_act_kernel[(triton.cdiv(m, QUANT_ROWS), groups)](
            a, q, scales, m, k, a.stride(0), q.stride(0), scales.stride(0), BLOCK_M=QUANT_ROWS,
            GROUP=FP8_BLOCK, UPCAST=_interpreted(), num_warps=4,
        )
    return q, scales


def gate_up(x, w13, h, out, pl: Plan, top_k, cfg, block_m, w13_scale=None, pdl=False, x_scale=None):
    """Launch the gate/up grouped GEMM with SwiGLU into h; also zeroes `out` (fp32). A config
    with "TMA" reads the weight tiles through a tensor descriptor. fp8 (`w13_scale`): with
    `x_scale`, x is already quantized (`quant_activations`), else each program quantizes its tiles."""
    fp8 = w13_scale is not None
    hidden, inter, max_blocks = x.shape[1], h.shape[1], pl.max_blocks
    cfg = dict(cfg)
    bk = cfg.pop("BLOCK_K")
    bk = FP8_BLOCK if fp8 else bk  # one scale per K step: the 128-column quantization group
    w_tiles = _tiles(w13.view(-1, hidden), [cfg["BLOCK_N"], bk]) if cfg.pop("TMA", False) else None
    ws = w13_scale if fp8 else w13  # any pointer when not fp8
    grid = max_blocks * triton.cdiv(inter, cfg["BLOCK_N"])
    per_prog = zero_share(out.numel(), grid)
    _gate_up_kernel[(grid,)](
        x,
        w13 if w_tiles is None else w_tiles,
        ws,
        h,
        out,
        *pl.kernel_args(),
        x.shape[0] * top_k,
        top_k,
        pl.num_experts,
        hidden,
        inter,
        max_blocks,
        out.numel(),
        per_prog,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        ws.stride(0) if fp8 else 0,
        ws.stride(1) if fp8 else 0,
        h.stride(0),
        x if x_scale is None else x_scale,
        0 if x_scale is None else x_scale.stride(0),
        BLOCK_M=block_m,
        BLOCK_K=bk,
        EVEN_K=hidden % bk == 0,
        FP8=fp8,
        ZERO_BLOCK=ZERO_BLOCK,
        UPCAST=_interpreted(),
        PDL=pdl,
        TMA=w_tiles is not None,
        A_FP8=fp8 and x_scale is not None,
        **pl.constexprs(),
        **cfg,
    )


def down(h, w2, out, pl: Plan, topk_weights, top_k, cfg, block_m, w2_scale=None, final=None, counters=None,
         pdl=False, h_scale=None):
    """Launch the down grouped GEMM: out[tok] += w * (h @ W2[e].T), fp32 atomics. With `final`
    (and `counters`, zeroed, one per column tile), the last program of each column tile also
    writes its columns of `final` (out cast to final's dtype). A config with "TMA" reads h's and
    the weights' tiles through tensor descriptors. fp8 (`w2_scale`): with `h_scale`, h is already
    quantized (`quant_activations`), else each program quantizes its tiles."""
    fp8 = w2_scale is not None
    hidden, inter, max_blocks = out.shape[1], h.shape[1], pl.max_blocks
    cfg = dict(cfg)
    bk = cfg.pop("BLOCK_K")
    bk = FP8_BLOCK if fp8 else bk
    h_tiles = w_tiles = None
    if cfg.pop("TMA", False):
        h_tiles = _tiles(h, [block_m, bk])
        w_tiles = _tiles(w2.view(-1, inter), [cfg["BLOCK_N"], bk])
        if h_tiles is None or w_tiles is None:
            h_tiles = w_tiles = None
    split_k = cfg.pop("SPLIT_K", 1)
    k_per_split = triton.cdiv(triton.cdiv(inter, bk), split_k) * bk
    split_k = triton.cdiv(inter, k_per_split)
    ws = w2_scale if fp8 else w2
    n_tiles = triton.cdiv(hidden, cfg["BLOCK_N"])
    grid = (max_blocks * n_tiles, split_k)
    fused = final is not None
    assert not fused or (counters is not None and counters.numel() >= n_tiles)
    tokens = out.shape[0]
    cast_m = min(max(16, CAST_TILE // cfg["BLOCK_N"]), max(16, triton.next_power_of_2(tokens)))
    _down_kernel[grid](
        h if h_tiles is None else h_tiles,
        w2 if w_tiles is None else w_tiles,
        ws,
        out,
        *pl.kernel_args()[:2],
        pl.topk_ids,
        topk_weights,
        counters if fused else out,
        final if fused else out,
        tokens * top_k,
        top_k,
        pl.num_experts,
        hidden,
        inter,
        tokens,
        max_blocks,
        k_per_split,
        max_blocks * split_k,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        ws.stride(0) if fp8 else 0,
        ws.stride(1) if fp8 else 0,
        out.stride(0),
        final.stride(0) if fused else 0,
        h if h_scale is None else h_scale,
        0 if h_scale is None else h_scale.stride(0),
        FUSED_CAST=fused,
        CAST_M=cast_m,
        BLOCK_M=block_m,
        BLOCK_K=bk,
        EVEN_K=inter % k_per_split == 0 and k_per_split % bk == 0,
        FP8=fp8,
        UPCAST=_interpreted(),
        PDL=pdl,
        TMA=w_tiles is not None,
        A_FP8=fp8 and h_scale is not None,
        **pl.constexprs(),
        **cfg,
        **({"launch_pdl": True} if pdl else {}),
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts with SwiGLU and the weighted top-k sum; see `reference.fused_moe`. With
    `w13_scale`/`w2_scale` (fp32 [E, ceil(N/128), ceil(K/128)], DeepSeek-V3's
    `weight_scale_inv`), w13/w2 are fp8 e4m3 and the result follows `reference.fused_moe_fp8`.
    `out` (optional, [T, H] in x's dtype, contiguous rows) receives the result.
    Launches: the alignment (none for at most TINY_MAX slots), gate/up, down, and a cast to x's
    dtype only above FUSED_CAST_MAX_TOKENS tokens (below, the down kernel writes the cast
    output itself); fp8 from PREQUANT_MIN_SLOTS slots also quantizes x and h before their GEMMs.
    A "GEMV" config runs `kernels.moe_gemv` instead: gate/up and down, nothing else.
    None syncs the host."""
    fp8 = w13_scale is not None
    tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter, hidden) and w2.shape == (num_experts, hidden, inter)
    assert not fp8 or (w2_scale is not None and w13.dtype == torch.float8_e4m3fn)
    if out is not None:
        assert out.shape == (tokens, hidden) and out.dtype == x.dtype and out.stride(1) == 1
    if tokens == 0:
        return x.new_zeros(0, hidden) if out is None else out
    cfg = config or get_config(x, w13, top_k, fp8)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    if cfg.get("GEMV") and fp8:  # the GEMVs are bf16/fp16/fp32 only
        cfg = default_config(tokens, top_k, num_experts, fp8)
    if cfg.get("GEMV"):
        buf, counters = workspace(tokens, hidden, x.device)
        final = out if out is not None else torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
        return moe_gemv.gemv_moe(x, w13, w2, topk_weights, topk_ids, cfg, buf, counters, final,
                                 pdl=use_pdl(x, fused_cast=True))
    bm = cfg["BLOCK_M"]
    pl = plan(topk_ids, num_experts, bm)
    buf, counters = workspace(tokens, hidden, x.device)
    acc, zero = buf[: tokens * hidden].view(tokens, hidden), buf
    if x.dtype == torch.float32 and out is not None:
        acc = zero = out  # the fp32 sums are the result itself
    h = torch.empty(pl.max_blocks * bm, inter, dtype=x.dtype, device=x.device)
    # gate/up zeroes the fp32 sums and the counters (`zero`) before down adds into them
    fused = casts_in_down(x)
    prequant = quantizes_once(fp8, tokens * top_k)
    pdl = launches_down_early(x, top_k, fp8)
    a, a_scale = quant_activations(x) if prequant else (x, None)
    gate_up(a, w13, h, zero, pl, top_k, cfg["gate_up"], bm, w13_scale.contiguous() if fp8 else None, pdl,
            x_scale=a_scale)
    final = None
    if fused:
        final = out if out is not None else torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    h, h_scale = quant_activations(h) if prequant else (h, None)
    down(
        h,
        w2,
        acc,
        pl,
        topk_weights,
        top_k,
        cfg["down"],
        bm,
        w2_scale.contiguous() if fp8 else None,
        final=final,
        counters=counters if fused else None,
        pdl=pdl,
        h_scale=h_scale,
    )
    if fused:
        return final
    if x.dtype == torch.float32:
        return acc
    if out is not None:
        return out.copy_(acc)
    return acc.to(x.dtype)
