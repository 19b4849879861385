"""The MoE layer at one or two tokens as matrix-vector products, one per routed (token, expert) slot.

At decode sizes the grouped GEMMs of `kernels.fused_moe` pad each expert's one or two rows to a
16-row tensor-core tile and split the weights into few large tiles (V2-Lite at one token: 132
gate/up programs of 512 KB, one per SM), so each GEMM's ramp and tail are a third of its time. Here
each program multiplies one slot's vector by a thin slice of its expert's rows (16 rows: 528
programs of 128 KB at V2-Lite's one token), in fp32 on the CUDA cores: memory-bound work with many
loads in flight and a short tail. Measured on the H200 (bf16, one layer under CUDA graphs):
V2-Lite 1 token 30.0 us against 34.0 for the grouped GEMMs (82% of the weight-streaming roofline
against 72%), 2 tokens 53.5 against 58.9; at 4 tokens the GEMMs are faster again, so tuned configs
ask for this path (`"GEMV": true`) only at the token counts where it measured faster.

gate/up: program (slot s, column tile n) computes h[s, n] = silu(x[t] . Wg[e, n]) * (x[t] . Wu[e, n])
and, first, zeroes its share of the fp32 sums and counters. down: program (slot s, column tile n)
adds w_s * (W2[e, n] . h[s]) into the fp32 sums of token t by atomics; the last of the tile's
slots writes the tile's columns of the output in x's dtype (no cast launch). With PDL the down
programs launch while gate/up still runs and wait for it before reading h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.workspace import COUNTER_COLUMNS, ZERO_BLOCK, zero_program_share, zero_share

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.3 on Hopper
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: callers pass pdl=False
    gdc_launch_dependents = gdc_wait = None

# The down kernel's column tiles each need a counter; the workspace holds one per 16 columns.
MIN_DOWN_BLOCK_N = COUNTER_COLUMNS


@triton.jit
def _gemv_gate_up_kernel(
    x_ptr, w_ptr, ids_ptr, h_ptr, zero_ptr, n_zero, zero_per_prog, H, I,
    stride_xm, stride_we, stride_wn, stride_hm,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ZERO_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """h[s, n] = silu(x[t] . Wg[e, n]) * (x[t] . Wu[e, n]) for this program's slot and columns."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    zero_program_share(zero_ptr, n_zero, zero_per_prog, ZERO_BLOCK)  # what down adds into
    n_tiles = tl.cdiv(I, BLOCK_N)
    slot = pid // n_tiles
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % I  # wrap instead of masking the weight loads; the store masks
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (slot // TOP_K).to(tl.int64) * stride_xm + offs_k
    g_ptrs = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    u_ptrs = g_ptrs + I * stride_wn
    # Products add up elementwise and are reduced across K once, after the loop.
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for kb in range(tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            xv = tl.load(x_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < H - kb * BLOCK_K
            xv = tl.load(x_ptrs, mask=k_ok, other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0)
        xv = xv.to(tl.float32)[None, :]
        acc_g += g.to(tl.float32) * xv
        acc_u += u.to(tl.float32) * xv
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    gate = tl.sum(acc_g, axis=1)
    h = gate / (1.0 + tl.exp(-gate)) * tl.sum(acc_u, axis=1)
    tl.store(h_ptr + slot.to(tl.int64) * stride_hm + offs_n, h.to(h_ptr.dtype.element_ty), mask=offs_n < I)


@triton.jit
def _gemv_down_kernel(
    h_ptr, w_ptr, ids_ptr, topk_w_ptr, sums_ptr, cnt_ptr, final_ptr, TK, H, I, T,
    stride_hm, stride_we, stride_wn, stride_sm, stride_fm,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """sums[t, n] += w_s * (W2[e, n] . h[s]); the tile's last slot writes final[:, n] = sums, cast."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(H, BLOCK_N)
    slot = pid // n_tiles
    pid_n = pid % n_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % H
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    weight = tl.load(topk_w_ptr + slot).to(tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + slot.to(tl.int64) * stride_hm + offs_k
    w_ptrs = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if PDL:
        gdc_wait()  # h, and the zeroed sums and counters, are gate/up's
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for kb in range(tl.cdiv(I, BLOCK_K)):
        if EVEN_K:
            hv = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < I - kb * BLOCK_K
            hv = tl.load(h_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * hv.to(tl.float32)[None, :]
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    n_ok = offs_n < H
    sum_ptrs = sums_ptr + (slot // TOP_K).to(tl.int64) * stride_sm + offs_n
    tl.atomic_add(sum_ptrs, weight * tl.sum(acc, axis=1), mask=n_ok, sem="relaxed")
    # Split-K semaphore pattern (as the grouped down kernel's cast): the barrier orders every
    # thread's atomics before the counter's release, the counter's acquire the read-back after them.
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if done == TK - 1:
        tl.debug_barrier()
        for t in range(T):
            # .cg: from L2, where the atomics landed, never a stale L1 line
            v = tl.load(sums_ptr + t * stride_sm + offs_n, mask=n_ok, cache_modifier=".cg")
            tl.store(final_ptr + t * stride_fm + offs_n, v.to(final_ptr.dtype.element_ty), mask=n_ok)
        tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")  # ready for the next call


def gemv_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    cfg: dict,
    workspace: torch.Tensor,
    counters: torch.Tensor,
    final: torch.Tensor,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """The layer into `final` ([T, H], x's dtype): gate/up then down, two launches. `workspace` is
    the fp32 buffer whose first T * H values are the sums and whose tail holds `counters`; gate/up
    zeroes all of it. `cfg` has "gate_up" and "down" launch parameters (BLOCK_N, BLOCK_K,
    num_warps, num_stages). Contiguous x, w13, w2, ids and weights."""
    tokens, hidden = x.shape
    inter, top_k = w2.shape[2], topk_ids.shape[1]
    slots = tokens * top_k
    up, dn = dict(cfg["gate_up"]), dict(cfg["down"])
    assert dn["BLOCK_N"] >= MIN_DOWN_BLOCK_N and counters.numel() >= triton.cdiv(hidden, dn["BLOCK_N"])
    h = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    sums = workspace[: tokens * hidden].view(tokens, hidden)
    ids = topk_ids.reshape(-1)
    grid = slots * triton.cdiv(inter, up["BLOCK_N"])
    per_prog = zero_share(workspace.numel(), grid)
    _gemv_gate_up_kernel[(grid,)](
        x, w13, ids, h, workspace, workspace.numel(), per_prog, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        TOP_K=top_k, EVEN_K=hidden % up["BLOCK_K"] == 0, ZERO_BLOCK=ZERO_BLOCK, PDL=pdl, **up,
    )
    _gemv_down_kernel[(slots * triton.cdiv(hidden, dn["BLOCK_N"]),)](
        h, w2, ids, topk_weights.reshape(-1), sums, counters, final, slots, hidden, inter, tokens,
        h.stride(0), w2.stride(0), w2.stride(1), sums.stride(0), final.stride(0),
        TOP_K=top_k, EVEN_K=inter % dn["BLOCK_K"] == 0, PDL=pdl, **dn,
        **({"launch_pdl": True} if pdl else {}),
    )
    return final
