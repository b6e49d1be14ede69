"""Llama family: Llama 1-3, SmolLM, TinyLlama, and by remapping Mistral (sliding window) and Qwen2 (q/k/v biases).

Checkpoint names: ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``model.layers.N.mlp.{gate,up,down}_proj``, ``model.layers.N.{input,post_attention}_layernorm``, ``model.norm``,
``lm_head``; q/k/v and gate/up are fused at load (see ``Model.sanitize``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import (BaseModelArgs, RoPE, activation, fuse, merge_heads, split_heads, tie_output, unfuse,
                   untie)
from .cache import Cache, KVCache, checked


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    use_sliding_window: bool = True      # qwen2 only: the window is off unless this is true
    max_window_layers: int = 0           # qwen2 only: layers >= this use the window
    layer_types: list | None = None      # transformers >= 4.54: "full_attention" / "sliding_attention" per layer

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True   # Qwen2 always has q/k/v biases (o_proj has none)

    def window(self, layer: int) -> int | None:
        """Sliding-window size of ``layer``, or None for full attention."""
        if not self.sliding_window:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        if self.model_type == "qwen2":
            return self.sliding_window if self.use_sliding_window and layer >= self.max_window_layers else None
        return self.sliding_window


class Attention(nn.Module):
    """Grouped-query attention. The checkpoint's q/k/v projections are fused into one ``qkv_proj`` by
    ``Model.sanitize``: one matmul per token instead of three, and RoPE applied to q and k in one go."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv = layer, args.num_attention_heads, args.num_key_value_heads
        self.window = args.window(layer)
        d = args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * d, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, args.hidden_size, bias=args.attention_bias and args.model_type != "qwen2")

    def forward(self, x: torch.Tensor, rope: RoPE, cos_sin, cache: Cache) -> torch.Tensor:
        h, kv = self.n_heads, self.n_kv
        qkv = split_heads(self.qkv_proj(x), h + 2 * kv)          # (B, H + 2 H_kv, T, D)
        qk = rope.apply(qkv[:, :h + kv], *cos_sin)                # (B, H + H_kv, T, D)
        out = cache.attend(self.layer, qk[:, :h], qk[:, h:], qkv[:, h + kv:], window=self.window)   # (B, H, T, D)
        return self.o_proj(merge_heads(out))


class MLP(nn.Module):
    """SwiGLU; gate and up projections fused into one ``gate_up_proj`` by ``Model.sanitize``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.act = activation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference, then return to the activation dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: RoPE, cos_sin, cache: Cache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, cos_sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(nn.Module):
    """Llama-family causal LM: ``model(input_ids, cache, attention_mask) -> logits (B, T, V)``."""

    # fused module suffix -> the checkpoint modules it concatenates (row-wise), under model.layers.N.
    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    LAYERS = "model.layers"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RoPE(int(args.head_dim * args.partial_rotary_factor), args.rope_theta, args.rope_scaling)

    @property
    def context_length(self) -> int:
        return self.args.max_position_embeddings

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size): what a cache stores per token."""
        return self.args.num_hidden_layers, self.args.num_key_value_heads, self.args.head_dim

    def make_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.args.num_hidden_layers, batch_size)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cache = checked(cache) if cache is not None else self.make_cache(input_ids.shape[0])
        positions = cache.begin(input_ids, attention_mask)
        h = self.model.embed_tokens(input_ids)                  # (B, T, C)
        cos_sin = self.rope.cos_sin(positions, h.dtype)
        for block in self.model.layers:
            h = block(h, self.rope, cos_sin, cache)
        return self.lm_head(self.model.norm(h))                 # (B, T, V)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> this module's state dict: drop rotary buffers, fuse q/k/v into ``qkv_proj`` and
        gate/up into ``gate_up_proj`` (one row-wise concatenation each), tie the output layer."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        fuse(weights, self.FUSED, self.LAYERS, self.args.num_hidden_layers)
        tie_output(weights, "lm_head.weight", "model.embed_tokens.weight", self.args.tie_word_embeddings)
        return weights

    def unsanitize(self, weights: dict[str, torch.Tensor], layout: bool = True) -> dict[str, torch.Tensor]:
        """This module's state dict -> checkpoint tensors (the inverse of ``sanitize``): fused projections split
        back into q/k/v and gate/up, a tied output layer left out. ``layout`` is unused (no transposes here)."""
        a = self.args
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        sizes = {"self_attn.qkv_proj": (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)),
                 "mlp.gate_up_proj": (("mlp.gate_proj", a.intermediate_size), ("mlp.up_proj", a.intermediate_size))}
        weights = dict(weights)
        unfuse(weights, sizes, self.LAYERS, a.num_hidden_layers)
        untie(weights, "lm_head.weight", a.tie_word_embeddings)
        return weights
