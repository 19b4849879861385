"""Our model code against transformers' on the same random checkpoints: logits and greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.engine.kv_cache import PagedKVCache, SlotKVCache
from core.model.loader import load_model

torch.set_num_threads(2)
transformers = pytest.importorskip("transformers")

LOGIT_BOUND = 1e-4
BF16_REL_BOUND = 0.25  # |bf16 - fp32| / |fp32| over all logits: ~3x the measured 0.083
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_attention_heads=4,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, kv_lora_rank=24, max_position_embeddings=256,
            initializer_range=0.1, routed_scaling_factor=2.5, bos_token_id=None, eos_token_id=None)
DEEPSEEK = {
    "qlora-yarn-4groups": dict(BASE, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=32,
                               n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                               n_shared_experts=1, rope_scaling=YARN),
    "no-qlora-2dense-2groups": dict(BASE, num_hidden_layers=4, first_k_dense_replace=2, q_lora_rank=None,
                                    n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                                    n_shared_experts=2),
    "no-interleave-no-norm": dict(BASE, num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=16,
                                  n_routed_experts=8, n_group=4, topk_group=3, num_experts_per_tok=3,
                                  n_shared_experts=1, rope_interleave=False, norm_topk_prob=False,
                                  rope_scaling=dict(YARN, factor=8.0, mscale=0.707, mscale_all_dim=0.707)),
}
# DeepSeek-V2: V2-Lite's routing (greedy over all experts, no q LoRA), and V2's (its groups ranked by
# their best expert, q LoRA, YaRN); both softmax, no correction bias, never renormalised.
DEEPSEEK_V2 = {
    "v2-lite-greedy": dict(BASE, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None, n_routed_experts=16,
                           num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.0),
    "v2-group-limited-yarn": dict(BASE, num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=32,
                                  n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                                  n_shared_experts=1, topk_method="group_limited_greedy", rope_scaling=YARN),
}
GQA = dict(vocab_size=320, hidden_size=64, intermediate_size=80, num_attention_heads=4, max_position_embeddings=256,
           initializer_range=0.1, bos_token_id=None, eos_token_id=None)
QWEN3 = {
    "qwen3-gqa-headdim": dict(GQA, num_hidden_layers=3, num_key_value_heads=2, head_dim=24, num_experts=8,
                              num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False),
    "qwen3-dense-layers-mqa": dict(GQA, num_hidden_layers=4, num_key_value_heads=1, num_experts=6,
                                   num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True,
                                   mlp_only_layers=[0], decoder_sparse_step=2, rope_theta=1e6),
    "qwen3-sliding-bias": dict(GQA, num_hidden_layers=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                               moe_intermediate_size=24, attention_bias=True, use_sliding_window=True,
                               sliding_window=8),
}
QWEN2_MOE = {  # q/k/v biases, the gated shared expert, dense layers by mlp_only_layers and decoder_sparse_step
    "qwen2-moe-shared-gate": dict(GQA, num_hidden_layers=3, num_key_value_heads=2, num_experts=8,
                                  num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                  norm_topk_prob=False),
    "qwen2-moe-dense-layers-norm": dict(GQA, num_hidden_layers=4, num_key_value_heads=4, num_experts=6,
                                        num_experts_per_tok=3, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=32, norm_topk_prob=True,
                                        mlp_only_layers=[0], decoder_sparse_step=2, rope_theta=1e6),
}
OLMOE = {  # q/k norms over the whole projections, and clamped q/k/v
    "olmoe-gqa": dict(GQA, num_hidden_layers=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
    "olmoe-clip-norm": dict(GQA, num_hidden_layers=2, num_key_value_heads=4, num_experts=6, num_experts_per_tok=3,
                            clip_qkv=0.5, norm_topk_prob=True),
}
MIXTRAL = {
    "mixtral-8x2": dict(GQA, num_hidden_layers=3, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
    "mixtral-sliding-mqa": dict(GQA, num_hidden_layers=2, num_key_value_heads=1, num_local_experts=6,
                                num_experts_per_tok=3, sliding_window=8, intermediate_size=32),
    "mixtral-mha-headdim": dict(GQA, num_hidden_layers=2, num_key_value_heads=4, head_dim=20, num_local_experts=4,
                                num_experts_per_tok=1, rope_theta=1e4),
}
CONFIGS = {**{("deepseek_v3", k): v for k, v in DEEPSEEK.items()}, **{("deepseek_v2", k): v for k, v in DEEPSEEK_V2.items()},
           **{("qwen3_moe", k): v for k, v in QWEN3.items()}, **{("qwen2_moe", k): v for k, v in QWEN2_MOE.items()},
           **{("olmoe", k): v for k, v in OLMOE.items()},
           **{("mixtral", k): v for k, v in MIXTRAL.items()}}


def make_checkpoint(dest: Path, config: dict, seed: int = 0, family: str = "deepseek_v3", **save_kwargs) -> Path:
    """A random transformers model saved with save_pretrained (DeepSeek's routing bias made non-zero)."""
    cfg = transformers.AutoConfig.for_model(family, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family == "deepseek_v3":
        with torch.no_grad():
            for layer in model.model.layers[cfg.first_k_dense_replace :]:
                layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.1)
    model.save_pretrained(dest, **save_kwargs)
    return dest


@pytest.fixture(scope="module", params=sorted(CONFIGS), ids="/".join)
def pair(request, tmp_path_factory):
    """(transformers model, our model) on one checkpoint."""
    family, name = request.param
    path = make_checkpoint(tmp_path_factory.mktemp(name), CONFIGS[request.param], family=family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ref, load_model(path, "float32", "cpu")


def ours_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits from a fresh cache."""
    cache = SlotKVCache(model.cache_layout(), 1, ids.shape[1] + 8, torch.float32)
    return model(ids, torch.zeros(1, dtype=torch.long), cache, torch.tensor([cache.allocate()]))


def prompt(vocab: int, n: int = 24, seed: int = 1) -> torch.Tensor:
    """Random prompt ids [1, n]."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match(pair):
    ref, ours = pair
    ids = prompt(ours.config.vocab_size, 48)
    diff = (ref(ids).logits - ours_logits(ours, ids)).abs().max().item()
    print(f"max |logit diff| = {diff:.2e}")
    assert diff < LOGIT_BOUND


@torch.no_grad()
def test_greedy_32_tokens_match(pair):
    ref, ours = pair
    ids = prompt(ours.config.vocab_size)
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                            do_sample=False, pad_token_id=0)

    # Ours, step by step on the engine's paged cache: one prefill, then one token per step.
    cache = PagedKVCache(ours.cache_layout(), num_blocks=12, block_size=8, max_slots=2, max_len=128,
                         dtype=torch.float32)
    cache.allocate(20)  # a neighbour holding blocks, so block tables and slots are exercised
    slot = torch.tensor([cache.allocate(ids.shape[1] + 32)])
    logits = ours(ids, torch.tensor([0]), cache, slot, last_only=True)
    got = ids
    for _ in range(32):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        got = torch.cat([got, nxt], dim=1)
        logits = ours(nxt, torch.tensor([got.shape[1] - 1]), cache, slot)
    assert got.tolist() == expected.tolist()


@torch.no_grad()
def test_sharded_checkpoint_and_bf16(tmp_path):
    path = make_checkpoint(tmp_path / "sharded", DEEPSEEK["qlora-yarn-4groups"], max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = prompt(320)
    want = ref(ids).logits
    assert (want - ours_logits(load_model(path), ids)).abs().max().item() < LOGIT_BOUND
    bf16 = load_model(path, "bf16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    cache = SlotKVCache(bf16.cache_layout(), 1, 64, torch.bfloat16)
    got = bf16(ids, torch.tensor([0]), cache, torch.tensor([cache.allocate()])).float()
    # Against the fp32 reference: bf16 rounding, plus the odd expert chosen differently, measured 0.083
    # relative error and 23/24 argmaxes (the miss a near-tie); another seed's model gives 1.45 and no
    # argmax agreement, the prompt shifted by one 1.2.
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < BF16_REL_BOUND
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.875


def quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled e4m3 as DeepSeek-V3 stores it: weight and weight_scale_inv per block."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale_inv = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale_inv[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale_inv


@torch.no_grad()
def test_fp8_block_scaled_checkpoint(tmp_path):
    block = 16  # small blocks so these small matrices span several (real checkpoints use 128)
    path = make_checkpoint(tmp_path / "fp8", DEEPSEEK["qlora-yarn-4groups"])
    weights = load_file(path / "model.safetensors")
    expected = {}
    for name, w in list(weights.items()):
        if name.endswith("proj.weight") or name.endswith("mqa.weight"):
            q, s = quantize_fp8(w, block)
            weights[name], weights[name + "_scale_inv"] = q, s
            expected[name] = torch.stack([
                torch.stack([q[i, j].float() * s[i // block, j // block] for j in range(w.shape[1])])
                for i in range(w.shape[0])
            ])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(config))
    model = load_model(path)
    attn = model.model.layers[0].self_attn
    q_a, kv_a = attn.qkv_a_proj.weight.split(list(attn.qkv_a_proj.parts.values()))  # one product, stacked
    assert torch.equal(q_a, expected["model.layers.0.self_attn.q_a_proj.weight"])
    assert torch.equal(kv_a, expected["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])
    assert torch.equal(attn.kv_b_proj.weight, expected["model.layers.0.self_attn.kv_b_proj.weight"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, expected["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, expected["model.layers.0.mlp.up_proj.weight"])
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj[3]
    inter = gate_up.shape[0] // 2
    assert torch.equal(gate_up[:inter], expected["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(gate_up[inter:], expected["model.layers.1.mlp.experts.3.up_proj.weight"])


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"topk_method": "noaux_tc"}, "unsupported topk_method 'noaux_tc' for deepseek_v2"),
    ({"moe_layer_freq": 2}, "unsupported moe_layer_freq 2 for deepseek_v2"),
])
def test_a_deepseek_v2_routing_we_do_not_run_is_a_clear_error(tmp_path, change, fragment):
    config = transformers.AutoConfig.for_model("deepseek_v2", **DEEPSEEK_V2["v2-lite-greedy"]).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=fragment):
        load_model(tmp_path)


def test_qwen2_moe_sliding_windows_are_a_clear_error(tmp_path):
    config = transformers.AutoConfig.for_model("qwen2_moe", **QWEN2_MOE["qwen2-moe-shared-gate"]).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config | {"use_sliding_window": True, "sliding_window": 16}))
    with pytest.raises(ValueError, match="unsupported use_sliding_window for qwen2_moe"):
        load_model(tmp_path)
