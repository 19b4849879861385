"""Fused MoE kernel against the PyTorch reference: alignment, edge cases of routing, dtypes, fp8."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from kernels import reference

fm = importlib.import_module("kernels.fused_moe")

# Small blocks keep the interpreter fast and make the edge cases (padding, several blocks per
# expert, split-K, grouped ordering, ragged K) appear at small sizes.
SMALL = {
    "BLOCK_M": 16,
    "gate_up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
    "down": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2},
}


def cfg(**over) -> dict:
    """SMALL with overrides applied to both kernels (BLOCK_M at the top)."""
    c = {
        "BLOCK_M": over.pop("BLOCK_M", SMALL["BLOCK_M"]),
        "gate_up": dict(SMALL["gate_up"]),
        "down": dict(SMALL["down"]),
    }
    for k, v in over.items():
        for part in ("gate_up", "down"):
            if k != "SPLIT_K" or part == "down":
                c[part][k] = v
    return c


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN never passes."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_layer(t, h, i, e, dtype, device):
    """Random layer with outputs of order one."""
    x = torch.randn(t, h, device=device).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=device) / i**0.5).to(dtype)
    return x, w13, w2


def random_routing(t, e, k, device, experts=None):
    """Distinct experts per token drawn from `experts` (default: all), softmax-like weights."""
    pool = torch.arange(e) if experts is None else torch.tensor(experts)
    ids = torch.stack([pool[torch.randperm(len(pool))[:k]] for _ in range(t)])
    w = torch.rand(t, k).softmax(-1)
    return w.to(device), ids.to(torch.int32).to(device)


def gold(x, w13, w2, w, ids):
    """The reference in fp32 on upcast inputs."""
    return reference.fused_moe(x.float().cpu(), w13.float().cpu(), w2.float().cpu(), w.cpu(), ids.cpu())


def check(x, w13, w2, w, ids, config, tol):
    """Kernel vs fp32 reference within `tol` (relative Frobenius)."""
    out = fm.fused_moe(x, w13, w2, w, ids, config=config)
    assert out.shape == x.shape and out.dtype == x.dtype
    err = rel_err(out.cpu(), gold(x, w13, w2, w, ids))
    assert err < tol, err


@pytest.mark.parametrize("tk,e,bm", [(1, 4, 16), (37, 5, 16), (500, 64, 16), (700, 8, 32), (2000, 3, 64)])
def test_align_is_a_padded_permutation(tk, e, bm, device, monkeypatch):
    monkeypatch.setattr(fm, "ALIGN_CHUNK", 256)  # several chunks at the larger sizes
    ids = torch.randint(0, e, (tk,), dtype=torch.int32)
    if tk > 30:
        ids[: tk // 2] = e - 1  # a crowded expert and, for e=64, empty ones
    sorted_ids, block_expert = fm.align_by_expert(ids.to(device), e, bm)
    sorted_ids, block_expert = sorted_ids.cpu().long(), block_expert.cpu().long()
    used = block_expert >= 0
    n_used = int(used.sum())
    assert used[:n_used].all() and not used[n_used:].any()
    assert torch.equal(block_expert[:n_used], block_expert[:n_used].sort().values)
    assert (block_expert[:n_used] < e).all()
    rows = sorted_ids[: n_used * bm].view(n_used, bm)
    real = rows < tk
    assert torch.equal(rows[real].sort().values, torch.arange(tk))  # every slot exactly once
    assert (rows[~real] == tk).all()
    assert (ids.long()[rows[real]] == block_expert[:n_used, None].expand_as(rows)[real]).all()
    counts = torch.bincount(ids.long(), minlength=e)
    assert n_used == int(((counts + bm - 1) // bm).sum())


@pytest.mark.parametrize("tiny_max", [0, 64])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("t", [1, 5, 37])
def test_bf16_random_routing(t, top_k, tiny_max, device, monkeypatch):
    """Both alignments: a separate launch (tiny_max=0) and inside the GEMMs (few slots)."""
    monkeypatch.setattr(fm, "TINY_MAX", tiny_max)
    x, w13, w2 = make_layer(t, 64, 48, 8, torch.bfloat16, device)
    w, ids = random_routing(t, 8, top_k, device)
    check(x, w13, w2, w, ids, SMALL, 1e-2)


def test_fp32_accumulation(device):
    x, w13, w2 = make_layer(21, 64, 48, 6, torch.float32, device)
    w, ids = random_routing(21, 6, 3, device)
    check(x, w13, w2, w, ids, SMALL, 5e-3 if device == "cuda" else 1e-5)  # tf32 on the GPU


@pytest.mark.parametrize("tiny_max", [0, 64])
def test_experts_with_no_tokens(tiny_max, device, monkeypatch):
    monkeypatch.setattr(fm, "TINY_MAX", tiny_max)
    x, w13, w2 = make_layer(9, 64, 32, 16, torch.bfloat16, device)
    w, ids = random_routing(9, 16, 2, device, experts=[3, 11, 12])
    check(x, w13, w2, w, ids, SMALL, 1e-2)


@pytest.mark.parametrize("top_k", [1, 8])
def test_all_tokens_on_one_expert(top_k, device):
    x, w13, w2 = make_layer(40, 64, 32, 8, torch.bfloat16, device)
    w, ids = random_routing(40, 8, top_k, device)
    ids[:, 0] = 5  # every token's first choice is expert 5: three blocks of 16 for one expert
    if top_k > 1:
        ids[:, 1:] = torch.stack([torch.tensor([e for e in range(8) if e != 5])] * 40)[:, : top_k - 1].to(ids)
    check(x, w13, w2, w, ids, SMALL, 1e-2)


def test_ragged_k_split_k_and_grouped_order(device):
    """Hidden and inter not multiples of BLOCK_K, the down K split over programs, GROUP_M > 1."""
    x, w13, w2 = make_layer(33, 80, 72, 4, torch.bfloat16, device)
    w, ids = random_routing(33, 4, 2, device)
    check(x, w13, w2, w, ids, cfg(SPLIT_K=3, GROUP_M=4), 1e-2)


def test_many_slots_several_align_chunks(device, monkeypatch):
    """Several chunks of slots in the alignment's count and scatter launches."""
    monkeypatch.setattr(fm, "ALIGN_CHUNK", 128)
    x, w13, w2 = make_layer(80, 32, 32, 16, torch.bfloat16, device)
    w, ids = random_routing(80, 16, 8, device)
    check(x, w13, w2, w, ids, cfg(BLOCK_M=32), 1e-2)


def test_default_config_and_int64_ids(device):
    x, w13, w2 = make_layer(3, 128, 64, 8, torch.bfloat16, device)
    w, ids = random_routing(3, 8, 2, device)
    check(x, w13, w2, w, ids.long(), None, 1e-2)


@pytest.mark.parametrize("prequant_min", [0, 10**9])
@pytest.mark.parametrize("t,top_k", [(1, 1), (19, 4)])
def test_fp8_w8a8_block_scales(t, top_k, prequant_min, device, monkeypatch):
    """DeepSeek-V3 fp8: kernel vs the fp8 reference (same quantization), and near bf16; the
    activations quantized once by their own launch (prequant_min 0) or by the GEMMs' programs."""
    monkeypatch.setattr(fm, "PREQUANT_MIN_SLOTS", prequant_min)
    h, i, e = 256, 256, 4
    x, w13, w2 = make_layer(t, h, i, e, torch.bfloat16, device)
    w13q, w13s = reference.quant_fp8_blocks(w13.float().cpu())
    w2q, w2s = reference.quant_fp8_blocks(w2.float().cpu())
    w, ids = random_routing(t, e, top_k, device)
    c = cfg(BLOCK_K=128, BLOCK_N=64)
    out = fm.fused_moe(
        x,
        w13q.to(device),
        w2q.to(device),
        w,
        ids,
        w13_scale=w13s.to(device),
        w2_scale=w2s.to(device),
        config=c,
    )
    ref = reference.fused_moe_fp8(x.cpu(), w13q, w2q, w.cpu(), ids.cpu(), w13s, w2s)
    # interpreter: bf16 truncation of the SwiGLU output moves some fp8 roundings by one step
    assert rel_err(out.cpu(), ref.float()) < (2e-2 if device == "cuda" else 3e-2)
    assert rel_err(out.cpu(), gold(x, w13, w2, w, ids)) < 0.1


def test_quant_activations_is_the_reference_quantization(device):
    """Per row per 128 columns, ragged last group, a zero row and a row of one large value."""
    a = torch.randn(37, 300) * torch.logspace(-3, 3, 37)[:, None]
    a[5] = 0.0
    a[6, 17] = 3e4
    q, s = fm.quant_activations(a.to(torch.bfloat16).to(device))
    ref_q, ref_s = reference.quant_fp8_rows(a.to(torch.bfloat16))
    assert q.shape == (37, 300) and s.shape == ref_s.shape == (37, 3)
    torch.testing.assert_close(s.cpu(), ref_s.float(), rtol=1e-6, atol=0)
    # the interpreter rounds ties away from zero, torch to even: at most one e4m3 step apart there
    same = q.cpu().float() == ref_q.float()
    assert same.float().mean() > 0.99
    step = 2.0 ** (torch.floor(torch.log2(ref_q.float().abs().clamp_min(2**-6))) - 3)
    assert ((q.cpu().float() - ref_q.float()).abs() <= step).all()


def test_fp8_reference_quantization_roundtrip():
    w = torch.randn(3, 200, 300)
    q, s = reference.quant_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2, 3)
    assert rel_err(reference.dequant_fp8_blocks(q, s), w) < 0.05


def test_zero_tokens(device):
    x, w13, w2 = make_layer(0, 32, 32, 4, torch.bfloat16, device)
    out = fm.fused_moe(
        x,
        w13,
        w2,
        torch.zeros(0, 2, device=device),
        torch.zeros(0, 2, dtype=torch.int32, device=device),
        config=SMALL,
    )
    assert out.shape == (0, 32)


@pytest.mark.parametrize(
    "dtype,tiny_max,fused_max",
    [
        (torch.bfloat16, 64, 4096),
        (torch.bfloat16, 0, 4096),
        (torch.float16, 0, 4096),
        (torch.bfloat16, 64, 0),
    ],
)
def test_final_cast_in_down_kernel(dtype, tiny_max, fused_max, device, monkeypatch):
    """The last down program of each column tile writes the cast output (fused_max large) or a
    separate cast does (0): every element written (NaN-poisoned output), split-K and several
    column tiles giving many contributors per tile, and the counters ready for a second call."""
    monkeypatch.setattr(fm, "TINY_MAX", tiny_max)
    monkeypatch.setattr(fm, "FUSED_CAST_MAX_TOKENS", fused_max)
    x, w13, w2 = make_layer(7, 96, 64, 8, dtype, device)
    w, ids = random_routing(7, 8, 3, device)
    c = cfg(SPLIT_K=2)
    for _ in range(2):
        out = torch.full_like(x, float("nan"))
        res = fm.fused_moe(x, w13, w2, w, ids, config=c, out=out)
        assert res.data_ptr() == out.data_ptr()
        assert rel_err(out.cpu(), gold(x, w13, w2, w, ids)) < 1e-2
    fresh = fm.fused_moe(x, w13, w2, w, ids, config=c)
    assert rel_err(fresh.cpu(), out.cpu().float()) < 1e-2


def test_final_cast_counts_idle_programs(device):
    """Most row blocks idle (tokens on 2 of 16 experts): the tile's last program may be an
    idle one, which must still write the output."""
    x, w13, w2 = make_layer(5, 64, 32, 16, torch.bfloat16, device)
    w, ids = random_routing(5, 16, 2, device, experts=[0, 1])
    out = torch.full_like(x, float("nan"))
    fm.fused_moe(x, w13, w2, w, ids, config=cfg(BLOCK_N=16), out=out)
    assert rel_err(out.cpu(), gold(x, w13, w2, w, ids)) < 1e-2


def test_fp32_into_given_output(device):
    x, w13, w2 = make_layer(6, 64, 48, 4, torch.float32, device)
    w, ids = random_routing(6, 4, 2, device)
    out = torch.full_like(x, float("nan"))
    fm.fused_moe(x, w13, w2, w, ids, config=SMALL, out=out)
    assert rel_err(out.cpu(), gold(x, w13, w2, w, ids)) < (5e-3 if device == "cuda" else 1e-5)


def test_final_cast_under_contention(device, monkeypatch):
    """Many row blocks and K splits race on each column tile's counter (on the GPU the programs
    run concurrently): repeated runs must all give the reference."""
    monkeypatch.setattr(fm, "TINY_MAX", 0)
    t = 64 if device == "cuda" else 24
    x, w13, w2 = make_layer(t, 128, 128, 8, torch.bfloat16, device)
    w, ids = random_routing(t, 8, 4, device)
    ref = gold(x, w13, w2, w, ids)
    for _ in range(5 if device == "cuda" else 1):
        out = torch.full_like(x, float("nan"))
        fm.fused_moe(x, w13, w2, w, ids, config=cfg(SPLIT_K=4), out=out)
        assert rel_err(out.cpu(), ref) < 1e-2


def tma(c: dict) -> dict:
    """`c` with both kernels reading their tiles through tensor descriptors."""
    return {**c, "gate_up": {**c["gate_up"], "TMA": True}, "down": {**c["down"], "TMA": True}}


@pytest.mark.parametrize("tiny_max", [0, 64])
def test_tma_tiles_ragged_k_and_split_k(tiny_max, device, monkeypatch):
    """Descriptor tiles: K (80 and 72) not a multiple of BLOCK_K, split-K whose last range runs
    past I, column tiles past I and H (they read the next rows of the weights), top-k 1 and 3."""
    monkeypatch.setattr(fm, "TINY_MAX", tiny_max)
    x, w13, w2 = make_layer(13, 80, 72, 4, torch.bfloat16, device)
    for top_k in (1, 3):
        w, ids = random_routing(13, 4, top_k, device)
        check(x, w13, w2, w, ids, tma(cfg(SPLIT_K=3, BLOCK_N=64)), 1e-2)


def test_tma_tiles_fp8(device):
    h, i, e = 256, 256, 4
    x, w13, w2 = make_layer(9, h, i, e, torch.bfloat16, device)
    w13q, w13s = reference.quant_fp8_blocks(w13.float().cpu())
    w2q, w2s = reference.quant_fp8_blocks(w2.float().cpu())
    w, ids = random_routing(9, e, 2, device)
    c = tma(cfg(BLOCK_K=128, BLOCK_N=64))
    args = (x, w13q.to(device), w2q.to(device), w, ids)
    out = fm.fused_moe(*args, w13_scale=w13s.to(device), w2_scale=w2s.to(device), config=c)
    ref = reference.fused_moe_fp8(x.cpu(), w13q, w2q, w.cpu(), ids.cpu(), w13s, w2s)
    assert rel_err(out.cpu(), ref.float()) < (2e-2 if device == "cuda" else 3e-2)


def test_tma_down_ignores_the_pad_rows_of_h(device, monkeypatch):
    """The down kernel's descriptor reads whole row blocks of h, pad rows included, which nobody
    writes: NaN there must not reach the output."""
    monkeypatch.setattr(fm, "TINY_MAX", 0)
    t, hd, inter, e, k = 11, 64, 48, 8, 2
    x, w13, w2 = make_layer(t, hd, inter, e, torch.bfloat16, device)
    w, ids = random_routing(t, e, k, device)
    c = tma(SMALL)
    pl = fm.plan(ids, e, c["BLOCK_M"])
    h = torch.full((pl.max_blocks * c["BLOCK_M"], inter), float("nan"), dtype=x.dtype, device=device)
    out = torch.empty(t, hd, dtype=torch.float32, device=device)
    fm.gate_up(x, w13, h, out, pl, k, c["gate_up"], c["BLOCK_M"])
    assert torch.isnan(h.float()).any()  # there are pad rows, and they stayed NaN
    fm.down(h, w2, out, pl, w, k, c["down"], c["BLOCK_M"])
    assert rel_err(out.cpu(), gold(x, w13, w2, w, ids)) < 1e-2


def test_tma_falls_back_to_pointers_where_rows_are_not_16_byte_aligned(device):
    x, w13, w2 = make_layer(5, 36, 20, 4, torch.bfloat16, device)  # rows of 72 and 40 bytes
    assert fm._tiles(w13.view(-1, 36), [32, 32]) is None and fm._tiles(w2.view(-1, 20), [32, 32]) is None
    w, ids = random_routing(5, 4, 2, device)
    check(x, w13, w2, w, ids, tma(SMALL), 1e-2)


def test_a_gpu_without_tuned_files_takes_those_of_its_architecture(tmp_path, monkeypatch):
    """An H200 runs the H100's tiles (same compute capability); another architecture does not."""
    (tmp_path / fm.DEVICES_FILE).write_text(json.dumps({"GPU A": [9, 0], "GPU C": [8, 0]}))
    monkeypatch.setattr(fm, "CONFIG_DIR", tmp_path)
    monkeypatch.delenv("MERIDIAN_MOE_CONFIG_DIR", raising=False)  # set when timing a copy of the configs
    fm._devices_like.cache_clear()
    try:
        assert fm._devices_like("GPU B", (9, 0)) == ["GPU B", "GPU A"]
        assert fm._devices_like("GPU A", (9, 0)) == ["GPU A"]
        assert fm._devices_like("GPU D", (10, 0)) == ["GPU D"]
    finally:
        fm._devices_like.cache_clear()


def test_shipped_configs_name_their_devices():
    """Every tuned file's GPU is in devices.json, so GPUs of its architecture can find it."""
    known = json.loads((fm.CONFIG_DIR / fm.DEVICES_FILE).read_text())
    suffixes = {fm.config_file_name(0, 0, 0, "", device).removeprefix("E0_H0_I0_") for device in known}
    for path in fm.CONFIG_DIR.glob("E*_H*_I*_*.json"):
        assert any(path.name.endswith(suffix) for suffix in suffixes), path.name


# GEMV path (kernels.moe_gemv): one or two tokens, one program per (slot, column tile).
GEMV = {
    "GEMV": True,
    "gate_up": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "down": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
}


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("t", [1, 2])
def test_gemv_bf16_random_routing(t, top_k, device):
    x, w13, w2 = make_layer(t, 64, 48, 8, torch.bfloat16, device)
    w, ids = random_routing(t, 8, top_k, device)
    check(x, w13, w2, w, ids, GEMV, 1e-2)


def test_gemv_ragged_shapes_and_fp32(device):
    """Hidden and inter multiples of neither BLOCK_K nor BLOCK_N (masked K steps, wrapped columns),
    both tokens on the same experts, fp32 throughout."""
    x, w13, w2 = make_layer(2, 80, 72, 6, torch.float32, device)
    w, ids = random_routing(1, 6, 3, device)
    check(x, w13, w2, w.repeat(2, 1), ids.repeat(2, 1), GEMV, 5e-3 if device == "cuda" else 1e-5)


def test_gemv_into_given_output_and_again(device):
    """`out` receives the result; the counters the last slot of each column tile resets serve the
    next call, and the sums are zeroed again (a second call with other routing is exact too)."""
    x, w13, w2 = make_layer(1, 64, 48, 8, torch.bfloat16, device)
    out = torch.full_like(x, float("nan"))
    for seed in range(3):
        torch.manual_seed(seed)
        w, ids = random_routing(1, 8, 6, device)
        res = fm.fused_moe(x, w13, w2, w, ids.long(), config=GEMV, out=out)
        assert res.data_ptr() == out.data_ptr()
        assert rel_err(out.cpu(), gold(x, w13, w2, w, ids)) < 1e-2


def test_gemv_is_the_default_at_one_or_two_tokens_only():
    assert fm.default_config(1, 8, 64)["GEMV"] and fm.default_config(2, 6, 64)["GEMV"]
    assert "GEMV" not in fm.default_config(3, 6, 64) and "GEMV" not in fm.default_config(1, 8, 32, fp8=True)


def test_a_gemv_entry_serves_only_token_counts_up_to_its_own(tmp_path, monkeypatch):
    name = fm.config_file_name(8, 64, 48, "bf16", "cpu")
    gemm = {"BLOCK_M": 16, "gate_up": SMALL["gate_up"], "down": SMALL["down"]}
    (tmp_path / name).write_text(json.dumps({"2": GEMV, "4": gemm}))
    monkeypatch.setenv("MERIDIAN_MOE_CONFIG_DIR", str(tmp_path))
    fm._tuned.cache_clear()
    try:
        w13 = torch.zeros(8, 96, 64, dtype=torch.bfloat16)
        picked = {t: fm.get_config(torch.zeros(t, 64, dtype=torch.bfloat16), w13, 2) for t in (1, 2, 3, 16)}
    finally:
        fm._tuned.cache_clear()
    assert picked[1] is picked[2] and picked[1]["GEMV"]
    assert "GEMV" not in picked[3] and "GEMV" not in picked[16]  # 3 is as near 2 as 4, but past it


def test_a_gemv_config_with_fp8_weights_takes_the_grouped_path(device):
    x, w13, w2 = make_layer(1, 256, 256, 4, torch.bfloat16, device)
    w, ids = random_routing(1, 4, 2, device)
    w13q, w13s = reference.quant_fp8_blocks(w13.float().cpu())
    w2q, w2s = reference.quant_fp8_blocks(w2.float().cpu())
    args = (x, w13q.to(device), w2q.to(device), w, ids)
    out = fm.fused_moe(*args, w13_scale=w13s.to(device), w2_scale=w2s.to(device), config=GEMV)
    ref = reference.fused_moe_fp8(x.cpu(), w13q, w2q, w.cpu(), ids.cpu(), w13s, w2s)
    assert rel_err(out.cpu(), ref.float()) < (2e-2 if device == "cuda" else 3e-2)


def test_gemv_final_cast_under_contention(device):
    """Eight slots race on each column tile's counter (concurrently on the GPU, where PDL also
    starts down before gate/up ends): repeated calls, each with its own routing, all match."""
    x, w13, w2 = make_layer(2, 256, 128, 16, torch.bfloat16, device)
    for _ in range(20 if device == "cuda" else 1):
        w, ids = random_routing(2, 16, 8, device)
        out = torch.full_like(x, float("nan"))
        fm.fused_moe(x, w13, w2, w, ids, config=GEMV, out=out)
        assert rel_err(out.cpu(), gold(x, w13, w2, w, ids)) < 1e-2
