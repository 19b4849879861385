"""The decoder step the small-LM export traces: a Hugging Face dense decoder with its KV cache as tensors.

Written out explicitly (embed, per layer: norm, q/k/v, rotary, cache concat, grouped attention with a
causal mask built from positions, MLP; final norm, last-position logits) over the checkpoint's own
modules, so the traced ONNX graph has no Python-side branches on shapes and every axis stays dynamic.
transformers' own forward builds its masks and caches with Python logic that tracing would freeze.
Families: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms), gemma3_text (Gemma 3's text
models: q/k norms, norms after attention and the MLP as well as before, a rotary table per layer
type, sliding-window layers), gemma2 (the same sandwich with one rotary table, attention logits
soft-capped), granite (Llama scaled: embeddings, residual branches and logits by the config's
multipliers), smollm3 (Llama with no rotation on every n-th layer), phi3 (Phi-3 and Phi-4-mini: one
q/k/v projection, rotation of the first part of each head only); the export checks the result
against transformers' generate, token for token.
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "granite", "smollm3", "phi3")
# Families whose sliding-window layers the export serves as full attention: it bounds the context
# to the window (edge.lm_export), within which the two are the same.
WINDOW_BOUNDED = ("gemma2", "gemma3_text")


class UnsupportedCheckpoint(ValueError):
    """The checkpoint is not a dense decoder of a family this export knows."""


class DecoderStep(nn.Module):
    """(input_ids, position_ids, past k/v per layer) -> (last logits, present k/v per layer)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        check_supported(model.config)
        self.model = model.model
        self.lm_head = model.lm_head
        self.num_layers = len(self.model.layers)
        # A rotary module with a table per layer type (Gemma 3's local and global bases) is asked
        # for each type; the other families' one table serves every layer.
        per_type = hasattr(self.model.rotary_emb, "layer_types")
        self.layer_types = list(model.config.layer_types) if per_type else None
        self.logit_cap = getattr(model.config, "final_logit_softcapping", None)
        # Granite's multipliers (1 elsewhere); its attention_multiplier is the attention's own scaling.
        self.embedding_multiplier = getattr(model.config, "embedding_multiplier", 1.0)
        self.residual_multiplier = getattr(model.config, "residual_multiplier", 1.0)
        self.logits_scaling = getattr(model.config, "logits_scaling", 1.0)
        # SmolLM3: layer i rotates q and k only where no_rope_layers[i] is 1.
        self.rotates = [bool(r) for r in getattr(model.config, "no_rope_layers", None) or [1] * self.num_layers]
        switch = longrope_switch_at(model.config)
        self.longrope = LongRope.of(model, switch) if switch is not None else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        hidden = self.model.embed_tokens(input_ids)  # Gemma's module scales by sqrt(hidden) itself
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        rotary = self._rotary(hidden, position_ids)
        presents: list[torch.Tensor] = []
        mask = None
        for i, layer in enumerate(self.model.layers):
            past_k, past_v = past[2 * i], past[2 * i + 1]
            if mask is None:
                mask = causal_bias(position_ids, past_k.shape[2], hidden.dtype)
            cos, sin = rotary[self.layer_types[i] if self.layer_types else None] if self.rotates[i] else (None, None)
            attn_out, k, v = _attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, past_k, past_v, mask)
            presents += [k, v]
            hidden = _after_attention(layer, hidden, attn_out, self.residual_multiplier)
        hidden = self.model.norm(hidden[:, -1:, :])  # only the last position is ever sampled from
        logits = self.lm_head(hidden)[:, 0, :].float()
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.logit_cap:
            logits = torch.tanh(logits / self.logit_cap) * self.logit_cap
        return (logits, *presents)

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """(cos, sin) per layer type (one entry, None, where every layer shares the table), broadcast over heads."""
        if self.longrope is not None:
            tables = {None: self.longrope(hidden, position_ids)}
        elif self.layer_types is None:
            tables = {None: self.model.rotary_emb(hidden, position_ids)}
        else:
            tables = {t: self.model.rotary_emb(hidden, position_ids, t) for t in sorted(set(self.layer_types))}
        return {t: (cos[:, None], sin[:, None]) for t, (cos, sin) in tables.items()}


def longrope_switch_at(config) -> int | None:
    """Longrope's original context, past which its long factors serve; None for other rotary types."""
    rope = getattr(config, "rope_parameters", None) or {}
    return int(rope["original_max_position_embeddings"]) if rope.get("rope_type") == "longrope" else None


class LongRope(nn.Module):
    """Phi-3's longrope tables: the short factors while a sequence fits the original context, the
    long ones once it does not. transformers picks them by writing into the rotary module's buffer,
    which the ONNX exporter cannot trace; the same choice is made here as a `where`, per sequence."""

    def __init__(self, short_inv_freq: torch.Tensor, long_inv_freq: torch.Tensor, original_max: int,
                 scaling: float) -> None:
        super().__init__()
        self.register_buffer("short_inv_freq", short_inv_freq, persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        self.original_max = original_max
        self.scaling = scaling

    @classmethod
    def of(cls, model: nn.Module, original_max: int) -> LongRope:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rotary = model.model.rotary_emb
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=original_max + 1)
        return cls(rotary.original_inv_freq.clone(), long_inv_freq, original_max, float(rotary.attention_scaling))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        long = (position_ids.max(dim=1, keepdim=True).values + 1 > self.original_max)[..., None]  # [batch, 1, 1]
        inv_freq = torch.where(long, self.long_inv_freq, self.short_inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(hidden.dtype), (emb.sin() * self.scaling).to(hidden.dtype)


def _after_attention(layer: nn.Module, hidden: torch.Tensor, attn_out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The residual adds and the MLP after a layer's attention: Llama's one norm before the MLP (its
    post_attention_layernorm), or Gemma's sandwich (a norm on the attention's output, and one before
    and one after the MLP). Each branch is scaled by `scale` before it is added (Granite's
    residual_multiplier)."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        hidden = hidden + layer.post_attention_layernorm(attn_out)
        return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    if scale != 1.0:
        hidden = hidden + attn_out * scale
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden)) * scale
    hidden = hidden + attn_out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def check_supported(config) -> None:
    """Refuse checkpoints whose forward differs from what DecoderStep computes."""
    family = getattr(config, "model_type", "")
    experts = (getattr(config, k, 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    if any(experts):  # asked first: for these the answer is where they do run
        raise UnsupportedCheckpoint(f"{family}: mixture-of-experts checkpoints belong to the core, not the edge")
    if family not in FAMILIES:
        raise UnsupportedCheckpoint(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    layer_types = getattr(config, "layer_types", None) or []
    if family not in WINDOW_BOUNDED and any(t != "full_attention" for t in layer_types):
        raise UnsupportedCheckpoint(f"{family}: sliding-window layers are not supported ({sorted(set(layer_types))})")


def causal_bias(position_ids: torch.Tensor, past_len: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [batch, 1, seq, past+seq]: query at position p sees keys at positions <= p."""
    seq = position_ids.shape[1]
    keys = torch.arange(past_len + seq, device=position_ids.device)  # cache slot j holds position j
    allowed = keys[None, None, :] <= position_ids[:, :, None]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def _attention(attn, x, cos, sin, past_k, past_v, mask):
    """Grouped-query attention of one layer over the cache plus the new positions."""
    batch, seq, _ = x.shape
    head_dim = attn.head_dim
    q, k, v = (t.view(batch, seq, -1, head_dim) for t in _project_qkv(attn, x))
    if hasattr(attn, "q_norm"):  # qwen3 normalises each head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cos is not None:  # None: a layer without rotary positions (SmolLM3's NoPE layers)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v], dim=2)
    groups = int(attn.num_key_value_groups)  # a constant of the checkpoint, not a traced shape
    k_all = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    v_all = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    scores = torch.matmul(q, k_all.transpose(2, 3)) * attn.scaling
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v_all).transpose(1, 2).reshape(batch, seq, -1)
    return attn.o_proj(out), k, v


def _project_qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of `x`: three projections, or Phi-3's one, split as [q heads | k heads | v heads]."""
    if not hasattr(attn, "qkv_proj"):
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q_size = attn.config.num_attention_heads * attn.head_dim
    kv_size = attn.num_key_value_heads * attn.head_dim
    return attn.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on the first cos.shape[-1] features of each head (all of them but where the
    config's partial_rotary_factor is below 1, as in Phi-4-mini); the rest pass unrotated."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last axis (the rotary convention of these families)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
