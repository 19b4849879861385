"""The fp32 sums and the counters the MoE down kernels add into, and the pass that zeroes them.

Both live in one buffer, so one pass clears both (0.0 and 0 share their bits). The gate/up kernels
(grouped, `kernels.fused_moe`, and GEMV, `kernels.moe_gemv`) each zero a share of it before their
own work: that saves a memset launch, and stream order, or down's wait on gate/up's grid under
PDL, puts the zeroing before the first add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ZERO_BLOCK = 1024  # elements per store of the zeroing pass
COUNTER_COLUMNS = 16  # one counter per this many output columns: the smallest down BLOCK_N


def workspace(tokens: int, hidden: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the buffer: fp32 sums [tokens, hidden] then the counters, the counters as int32 [column
    tiles at the smallest BLOCK_N])."""
    n_cnt = triton.cdiv(hidden, COUNTER_COLUMNS)
    buf = torch.empty(tokens * hidden + n_cnt, dtype=torch.float32, device=device)
    return buf, buf[tokens * hidden :].view(torch.int32)


def zero_share(numel: int, programs: int) -> int:
    """Elements each of `programs` programs zeroes (whole ZERO_BLOCKs) so that they cover `numel`."""
    return triton.cdiv(triton.cdiv(numel, programs), ZERO_BLOCK) * ZERO_BLOCK


@triton.jit
def zero_program_share(zero_ptr, n_zero, per_prog, ZERO_BLOCK: tl.constexpr):
    """Zero this program's `per_prog` elements of the buffer at `zero_ptr` (of `n_zero`)."""
    z0 = tl.program_id(0) * per_prog
    for z in range(z0, tl.minimum(z0 + per_prog, n_zero), ZERO_BLOCK):
        zo = z + tl.arange(0, ZERO_BLOCK)
        tl.store(zero_ptr + zo, tl.zeros([ZERO_BLOCK], tl.float32), mask=zo < n_zero)
