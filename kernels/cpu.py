"""CPU implementations the dispatcher takes off CUDA where the reference's op count, not its math,
is the cost: a decode step of a small model is hundreds of tiny ops, each paying the same fixed
overhead. Same math as `kernels.reference`; tests/kernels/test_cpu.py holds them to it.

`fused_moe`: the reference finds each expert's tokens with a boolean scan and a host sync and
scatters each expert's output with its own index_add, about ten ops per expert. Here the routed rows
are laid out by expert once, so each expert's GEMMs run over a contiguous slice; SwiGLU, the un-sort
and the weighted top-k sum each run once over all rows. Only fp32 rounding (the order of the top-k
sum) differs from the reference.

`route`: the reference's scoring and group-limited top-k in about two thirds of its ops.

`rms_norm`: torch's own RMSNorm, one op where the reference spells out seven.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.reference import rank_groups


# CPU BLAS rounds a row differently with the row count of the call (GEMV and small-M paths below
# 4 rows; another split of the work across threads for odd counts). Row counts that are multiples
# of 4 all agree, so products are padded to one: a token's result then does not depend on how many
# other rows share the call (batch invariance: a stream's tokens must not depend on its neighbours
# in the batch). The model's linear layers use the same padding (core.model.layers.Linear).
GEMM_ROW_MULTIPLE = 4
# That holds for MKL on AMD (the project's machines). MKL on an Intel Xeon takes its own paths,
# which round a row of a 4-row product unlike the same row of a 512-row one (and, with two or more
# threads, differ at every row count for a 2048 x 2048 weight); but there too a product of a fixed
# row count gives a row the same bits at any position and beside any neighbours (measured at 4 to 64
# rows, 1 to 8 threads). So where a probe finds padded single calls disagree, `invariant_rows` runs
# products as calls of exactly GEMM_ROW_MULTIPLE rows: exact again, at the price of reading the
# weights once per 4 rows.
_PROBE_SHAPES = ((256, 512), (2048, 2048), (96, 1579))  # (K, N): small, large and ragged
_PROBE_ROWS = (4, 8, 12, 16, 20, 32, 64, 100, 128)

# torch's elementwise loops run over a contiguous tensor as one flat range, 2 x 16 fp32 lanes at a
# time (AVX-512), the leftover tail through the scalar function, which can round exp or sigmoid
# another way; with two threads the range is split in halves first. So a row's values depend on
# where the tensor ends unless every row count the tensor can have keeps the flat length (and its
# halves) a multiple of the block.
_ELEMENTWISE_BLOCK = 64


def elementwise_row_multiple(width: int) -> int:
    """Row multiple for [rows, width] fp32 tensors whose elementwise results must not depend on
    `rows` (and a multiple of GEMM_ROW_MULTIPLE, so the GEMM that makes them pads alike)."""
    rows = _ELEMENTWISE_BLOCK // math.gcd(width, _ELEMENTWISE_BLOCK)
    return math.lcm(rows, GEMM_ROW_MULTIPLE)


@functools.cache
def padded_products_are_invariant(threads: int) -> bool:
    """Whether this machine's BLAS, on `threads` threads, gives a row the same bits at every row
    count that is a multiple of GEMM_ROW_MULTIPLE (probed once per thread count, ~0.1 s)."""
    g = torch.Generator().manual_seed(0)
    for k, n in _PROBE_SHAPES:
        w = torch.randn(n, k, generator=g)
        x = torch.randn(256, k, generator=g)
        whole = F.linear(x, w)
        if not all(torch.equal(F.linear(x[:m], w), whole[:m]) for m in _PROBE_ROWS):
            return False
    return True


def row_step(rows: int) -> int:
    """Rows per call of a CPU product over `rows` rows: all of them where padded calls are
    batch-invariant here, else GEMM_ROW_MULTIPLE (see there)."""
    if rows <= GEMM_ROW_MULTIPLE or padded_products_are_invariant(torch.get_num_threads()):
        return max(rows, 1)
    return GEMM_ROW_MULTIPLE


def invariant_rows(
    product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int = 0
) -> torch.Tensor:
    """`product(x)` for a product whose rows along `dim` (a multiple of GEMM_ROW_MULTIPLE of them)
    must not depend on one another: on CPU in calls of `row_step` rows (on a GPU, where nothing is
    batch-invariant, in one)."""
    step = x.shape[dim] if x.is_cuda else row_step(x.shape[dim])
    if step >= x.shape[dim]:
        return product(x)
    return torch.cat([product(part) for part in x.split(step, dim)], dim)


def pad_rows(x: torch.Tensor, multiple: int = GEMM_ROW_MULTIPLE, dim: int = 0) -> torch.Tensor:
    """`x` with zero rows appended along `dim` up to a multiple of `multiple`."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_k w_k * W2[e_k] (silu(G[e_k] x) * (U[e_k] x)); shapes as `reference.fused_moe`."""
    tokens, k = topk_ids.shape
    inter = w2.shape[2]
    layout = _ExpertLayout(topk_ids.reshape(-1).long(), w13.shape[0], k)
    rows = F.pad(x, (0, 0, 0, 1)).index_select(0, layout.source)  # pad slots read the appended zero row
    gate_up = layout.linear(rows, w13)
    down = layout.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2)
    routed = down.index_select(0, layout.position).view(tokens, k, -1)  # back to (token, choice)
    routed = routed if routed.dtype == torch.float32 else routed.float()
    topk_weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    out = torch.bmm(topk_weights.unsqueeze(1), routed).squeeze(1)  # fp32 sum, as the reference
    return out if out.dtype == x.dtype else out.to(x.dtype)


# Up to this many routed rows (decode steps) the expert layout is worked out in Python from one
# host copy of the ids: 18 us against 58 us of tensor ops at 16 rows; the ops win from about 128.
_HOST_LAYOUT_MAX_ROWS = 128


class _ExpertLayout:
    """Routed rows (token, choice) grouped by expert, each group padded to GEMM_ROW_MULTIPLE rows,
    so every expert's GEMM runs on a contiguous slice of a row count BLAS rounds alike (batch
    invariance), with no per-expert padding. Only the experts that got rows are visited: a decode
    step hits a few of them (grouped_mm's CPU fallback runs an mm for every expert, idle or not).

    `source`: the token each row of the layout reads (the zero row `tokens` for padding);
    `position`: each routed row's place in the layout; `groups`: (expert, rows) in layout order."""

    def __init__(self, flat_ids: torch.Tensor, experts: int, k: int) -> None:
        if len(flat_ids) <= _HOST_LAYOUT_MAX_ROWS:
            self._on_host(flat_ids.tolist(), experts, k)
        else:
            self._with_ops(flat_ids, experts, k)

    def _on_host(self, ids: list[int], experts: int, k: int) -> None:
        members: list[list[int]] = [[] for _ in range(experts)]
        for slot, expert in enumerate(ids):
            members[expert].append(slot)
        source, position, self.groups = [], [0] * len(ids), []
        for expert, slots in enumerate(members):
            if slots:
                for slot in slots:
                    position[slot] = len(source)
                    source.append(slot // k)
                pad = -len(slots) % GEMM_ROW_MULTIPLE
                source.extend([len(ids) // k] * pad)
                self.groups.append((expert, len(slots) + pad))
        self.source, self.position = torch.tensor(source), torch.tensor(position)

    def _with_ops(self, flat_ids: torch.Tensor, experts: int, k: int) -> None:
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=experts)
        padded = (counts + GEMM_ROW_MULTIPLE - 1) // GEMM_ROW_MULTIPLE * GEMM_ROW_MULTIPLE
        ends = padded.cumsum(0)
        sorted_ids = flat_ids[order]
        rank = torch.arange(len(order)) - (counts.cumsum(0) - counts)[sorted_ids]  # place within its group
        dest = (ends - padded)[sorted_ids] + rank
        sizes = padded.tolist()  # the one host sync
        self.groups = [(e, n) for e, n in enumerate(sizes) if n]
        self.source = torch.full((sum(sizes),), len(flat_ids) // k, dtype=torch.long)  # the zero row, by default
        self.source[dest] = order // k
        self.position = torch.empty_like(order)
        self.position[order] = dest

    def linear(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows [S, K] in the grouped layout; weight [E, N, K] -> [S, N]."""
        out, begin = rows.new_empty(rows.shape[0], weight.shape[1]), 0
        columns = weight.transpose(1, 2)
        step = row_step(rows.shape[0])
        for expert, n in self.groups:
            for lo in range(begin, begin + n, min(step, n)):  # each group's rows: a multiple of the step
                hi = lo + min(step, n)
                torch.mm(rows[lo:hi], columns[expert], out=out[lo:hi])
            begin += n
        return out


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    correction_bias: torch.Tensor | None = None,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    group_score: str = "top2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.route` in fewer ops: no casts of what is fp32 already, groups dropped by one mask."""
    logits = logits if logits.dtype == torch.float32 else logits.float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias
    if n_group > 1:
        grouped = choice.view(len(choice), n_group, -1)
        keep = rank_groups(grouped, group_score).topk(topk_group, dim=-1, sorted=False).indices
        dropped = torch.ones(grouped.shape[:2], dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view_as(scores)
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm`: normalise in fp32, cast back to x's dtype, then scale by `weight`."""
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        y = F.rms_norm(x, x.shape[-1:], weight, eps)  # nothing to cast: the weight goes inside
    else:
        y = weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    return y if residual is None else (y, residual)
