"""config.json -> one typed ModelConfig, shared by every family the core serves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

SUPPORTED_FAMILIES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
# DeepSeek-V2's expert choice (its topk_method): over all experts, or inside the groups ranked best.
DEEPSEEK_V2_TOPK = ("greedy", "group_limited_greedy")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `type` is "default" or "yarn"."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Hugging Face config.json that our model code reads."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False  # biases on q, k and v only, not on the output projection (Qwen2)
    clip_qkv: float | None = None  # q, k and v clamped to +-this (OLMoE)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = False
    sliding_window: int | None = None  # attend to the last this many positions only (GQA families)
    # Mixture of experts.
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's one shared expert, gated by a sigmoid
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring: str = "softmax"
    group_score: str = "top2"  # how groups rank: their two best scores summed (V3), or their best (V2)
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias steers the expert choice
    first_k_dense_replace: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Multi-head latent attention (DeepSeek).
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # Block-scaled fp8 checkpoints: (rows, cols) of one scale block.
    fp8_block: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """Read a config.json dict, taking both the transformers v5 and the legacy key spellings."""
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; supported: silu")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        values: dict = dict(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw.get("intermediate_size", 0),
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope=_rope(raw),
        )
        if model_type in ("deepseek_v3", "deepseek_v2"):
            values.update(_deepseek(raw))
        elif model_type in ("qwen3_moe", "qwen2_moe"):
            values.update(_qwen_moe(raw))
        elif model_type == "mixtral":
            values.update(
                n_routed_experts=_first(raw, "num_local_experts", "num_experts"),
                num_experts_per_tok=raw["num_experts_per_tok"],
                moe_intermediate_size=raw["intermediate_size"],
                norm_topk_prob=True,
                sliding_window=raw.get("sliding_window"),
            )
        elif model_type == "olmoe":
            values.update(
                n_routed_experts=_first(raw, "num_experts", "num_local_experts"),
                num_experts_per_tok=raw["num_experts_per_tok"],
                moe_intermediate_size=raw["intermediate_size"],  # every layer's MLP is the experts
                norm_topk_prob=raw.get("norm_topk_prob", False),
                clip_qkv=raw.get("clip_qkv"),
            )
        quant = raw.get("quantization_config") or {}
        if quant.get("quant_method") == "fp8":
            values["fp8_block"] = tuple(quant.get("weight_block_size") or (128, 128))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        """Read `path` (a config.json or the checkpoint directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))


def check_checkpoint(path: Path) -> ModelConfig:
    """The config of checkpoint folder `path`; a ValueError saying why when the core cannot serve it."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        return ModelConfig.from_file(path)
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} cannot be served by the core: {exc}") from None


def _first(raw: dict, *keys: str):
    """The value of the first of `keys` that config.json has (transformers writes either spelling)."""
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    raise KeyError(f"config.json has none of {', '.join(keys)}")


def _qwen_moe(raw: dict) -> dict:
    """Qwen3-MoE's fields, and Qwen2-MoE's: biases on q/k/v and a shared expert besides."""
    values = dict(
        n_routed_experts=_first(raw, "num_experts", "num_local_experts"),
        num_experts_per_tok=raw["num_experts_per_tok"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        norm_topk_prob=raw.get("norm_topk_prob", False),
        decoder_sparse_step=raw.get("decoder_sparse_step") or 1,
        mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
    )
    if raw["model_type"] == "qwen3_moe":
        # transformers reads the window only when use_sliding_window is set
        return values | dict(sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window") else None)
    if raw.get("use_sliding_window"):  # per-layer windows past max_window_layers: not implemented
        raise ValueError("unsupported use_sliding_window for qwen2_moe; supported: false")
    return values | dict(qkv_bias=raw.get("qkv_bias", True),
                         shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size") or 0)


def _deepseek(raw: dict) -> dict:
    """DeepSeek-V3's fields, and V2's: the same latent attention and experts, routed by a softmax
    with no correction bias, never renormalised (transformers ignores V2's norm_topk_prob), inside
    the groups whose best expert scores highest when its topk_method is group_limited_greedy."""
    values = dict(
        head_dim=raw["qk_rope_head_dim"],  # transformers sets it so; rope acts on these dims only
        rope_interleave=raw.get("rope_interleave", True),
        n_routed_experts=raw["n_routed_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        n_shared_experts=raw.get("n_shared_experts") or 0,
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
        norm_topk_prob=raw.get("norm_topk_prob", True),
        scoring=raw.get("scoring_func", "sigmoid"),
        correction_bias=True,
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=raw["kv_lora_rank"],
        qk_rope_head_dim=raw["qk_rope_head_dim"],
        qk_nope_head_dim=raw["qk_nope_head_dim"],
        v_head_dim=raw["v_head_dim"],
    )
    if raw["model_type"] == "deepseek_v3":
        return values
    method = raw.get("topk_method", "greedy")
    if method not in DEEPSEEK_V2_TOPK:
        raise ValueError(f"unsupported topk_method {method!r} for deepseek_v2; supported: {', '.join(DEEPSEEK_V2_TOPK)}")
    if (raw.get("moe_layer_freq") or 1) != 1:  # transformers makes every layer past the dense ones MoE
        raise ValueError(f"unsupported moe_layer_freq {raw['moe_layer_freq']} for deepseek_v2; supported: 1")
    grouped = method == "group_limited_greedy"
    return values | dict(
        rope_interleave=True,  # V2 rotates pairs as complex numbers: V3's interleaved layout
        scoring="softmax", correction_bias=False, norm_topk_prob=False, group_score="max",
        n_group=values["n_group"] if grouped else 1, topk_group=values["topk_group"] if grouped else 1,
    )


def _rope(raw: dict) -> RopeConfig:
    """RoPE from `rope_parameters` (transformers v5) or `rope_scaling` + `rope_theta` (older files)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"unsupported rope type {kind!r}; supported: default, yarn")
    if kind == "default":
        return RopeConfig(theta=theta)
    max_pos = raw.get("max_position_embeddings", 4096)
    original = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor") or max_pos / original
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=params.get("beta_fast") or 32.0,
        beta_slow=params.get("beta_slow") or 1.0,
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=params.get("truncate", True),
    )
