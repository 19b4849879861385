"""The forward pass every family shares: embed, rotate, mask, run the decoder layers, norm, project.

A family supplies its decoder layers (under `self.model`, the checkpoint's `model.` prefix), the rotary
table for its rope dims and the per-token shapes its layers keep in the KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.cpu import GEMM_ROW_MULTIPLE
from core.model.batch import Batch, kv_length
from core.model.config import ModelConfig
from core.model.layers import Linear, RMSNorm, RotaryEmbedding, causal_mask


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)): the layer of every family here. `mlp_name` is
    the checkpoint's name for the feed-forward part ("mlp"; Mixtral's is "block_sparse_moe")."""

    def __init__(self, cfg: ModelConfig, index: int, attention: nn.Module, mlp: nn.Module, mlp_name: str = "mlp") -> None:
        super().__init__()
        self.index = index
        self.self_attn = attention
        self.mlp_name = mlp_name
        self.add_module(mlp_name, mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, self.index)
        return x + self._modules[self.mlp_name](self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (the checkpoint's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids in, next-token logits out, reading and writing the KV cache of the given slots."""

    sliding_window: int | None = None

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module], rope_dim: int, rope_interleave: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, layers)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, rope_dim, rope_interleave)

    def cache_layout(self) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer, the per-token shapes of the tensors the layer keeps in the cache."""
        raise NotImplementedError

    def forward(
        self,
        tokens: torch.Tensor,
        start: torch.Tensor,
        cache,
        slots: torch.Tensor,
        last_only: bool = False,
        lengths: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] at positions start[b]..start[b]+T-1 -> logits [B, T or 1, V] in fp32.

        `lengths`: rows padded on the right hold lengths[b] real tokens (a prefill: each row is then
        attended at its own length); with `last_only` the logits are those of each row's last real token.
        `kv_len`: how many cached positions the rows read (a multiple of batch.KV_ALIGN, at least
        max(start) + T); by default worked out from `start`, which costs a GPU a host sync.
        """
        rows, t = tokens.shape
        if t == 1 and lengths is None and not tokens.is_cuda and rows % GEMM_ROW_MULTIPLE:
            # A CPU decode step pads its rows once, here, rather than in every product (see
            # kernels.cpu.GEMM_ROW_MULTIPLE), with copies of its last row: a copy computes the same
            # bits as its original, so it writes the same cache entry and picks the same experts.
            repeat = torch.arange(rows + (-rows % GEMM_ROW_MULTIPLE)).clamp_(max=rows - 1)
            tokens, start, slots = tokens[repeat], start[repeat], slots[repeat]
        positions = start[:, None] + torch.arange(t, device=tokens.device)[None, :]
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(positions, x.dtype)
        if kv_len is None:
            kv_len = kv_length(int(start.max()) + t)
        mask = causal_mask(start, t, kv_len, self.sliding_window)
        spans = None if lengths is None else list(zip(start.tolist(), lengths.tolist()))
        batch = Batch(cache, slots, start, cos, sin, mask, spans)
        for layer in self.model.layers:
            x = layer(x, batch)
        if last_only:
            if lengths is None:
                x = x[:, -1:]
            else:
                x = x[torch.arange(x.shape[0], device=x.device), lengths - 1].unsqueeze(1)
        return self.lm_head(self.model.norm(x))[:rows].float()


class GQACausalLM(CausalLM):
    """A family of grouped-query attention layers: the cache holds rotated keys and values,
    [kv heads, head dim] per token, and a configured sliding window masks past it."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]) -> None:
        super().__init__(cfg, layers, cfg.head_dim)
        self.sliding_window = cfg.sliding_window

    def cache_layout(self) -> list[tuple[tuple[int, ...], ...]]:
        kv = (self.config.num_key_value_heads, self.config.head_dim)
        return [(kv, kv)] * self.config.num_hidden_layers
