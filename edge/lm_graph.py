"""The decoder step the small-LM export traces: a Hugging Face dense decoder with its KV cache as tensors.

Written out explicitly (embed, per layer: norm, q/k/v, rotary, cache concat, grouped attention with a
causal mask built from positions, MLP; final norm, last-position logits) over the checkpoint's own
modules, so the traced ONNX graph has no Python-side branches on shapes and every axis stays dynamic.
transformers' own forward builds its masks and caches with Python logic that tracing would freeze.
Families: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms), gemma3_text (Gemma 3's text
models: q/k norms, norms after attention and the MLP as well as before, a rotary table per layer
type, sliding-window layers), granite (Llama scaled: embeddings, residual branches and logits by
the config's multipliers), smollm3 (Llama with no rotation on every n-th layer); the export checks
the result against transformers' generate, token for token.
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "granite", "smollm3")
# Families whose sliding-window layers the export serves as full attention: it bounds the context
# to the window (edge.lm_export), within which the two are the same.
WINDOW_BOUNDED = ("gemma3_text",)


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
        if self.layer_types is None:
            tables = {None: self.model.rotary_emb(hidden, position_ids)}
        else:
            tables = {t: self.model.rotary_emb(hidden, position_ids, t) for t in sorted(set(self.layer_types))}
        return {t: (cos[:, None], sin[:, None]) for t, (cos, sin) in tables.items()}


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
    q = attn.q_proj(x).view(batch, seq, -1, head_dim)
    k = attn.k_proj(x).view(batch, seq, -1, head_dim)
    v = attn.v_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # qwen3 normalises each head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cos is not None:  # None: a layer without rotary positions (SmolLM3's NoPE layers)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last axis (the rotary convention of these families)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
