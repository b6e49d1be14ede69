"""GPT-NeoX (Pythia, GPT-NeoX-20B, RedPajama-INCITE, StableLM-alpha ...): fused q/k/v projection, partial rotary
embeddings (halves, like Llama) and, usually, attention and MLP in parallel.

Checkpoint names: ``gpt_neox.embed_in``, ``gpt_neox.layers.N.{input,post_attention}_layernorm``,
``gpt_neox.layers.N.attention.{query_key_value,dense}``, ``gpt_neox.layers.N.mlp.{dense_h_to_4h,dense_4h_to_h}``,
``gpt_neox.final_layer_norm``, ``embed_out`` (not tied unless ``tie_word_embeddings``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import BaseModelArgs, RoPE, activation, merge_heads, tie_output, untie
from .cache import Cache, KVCache, checked


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0                 # ``rotary_emb_base`` in older configs (see normalize_rope_config)
    partial_rotary_factor: float = 0.25         # ``rotary_pct`` in older configs; transformers' default is 0.25
    rope_scaling: dict | None = None
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.head_dim = self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, args.num_attention_heads, args.head_dim
        c = args.hidden_size
        self.query_key_value = nn.Linear(c, 3 * c, bias=args.attention_bias)
        self.dense = nn.Linear(c, c, bias=args.attention_bias)

    def forward(self, x: torch.Tensor, rope: RoPE, cos_sin, cache: Cache) -> torch.Tensor:
        b, t, _ = x.shape
        # The fused output is laid out per head as [q | k | v]: (B, T, H, 3*D) -> (B, H, T, 3*D).
        qkv = self.query_key_value(x).view(b, t, self.n_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)                                        # each (B, H, T, D)
        q, k = rope.apply(q, *cos_sin), rope.apply(k, *cos_sin)
        return self.dense(merge_heads(cache.attend(self.layer, q, k, v)))    # (B, T, C)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, args.intermediate_size)
        self.dense_4h_to_h = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = activation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.parallel = args.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.attention = Attention(args, layer)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: RoPE, cos_sin, cache: Cache) -> torch.Tensor:
        a = self.attention(self.input_layernorm(x), rope, cos_sin, cache)
        if self.parallel:
            # x + attn(ln1(x)) + mlp(ln2(x)): both branches read the block input.
            return x + a + self.mlp(self.post_attention_layernorm(x))
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoXModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_in = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)


class Model(nn.Module):
    """GPT-NeoX causal LM: ``model(input_ids, cache, attention_mask) -> logits (B, T, V)``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gpt_neox = GPTNeoXModel(args)
        self.embed_out = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RoPE(int(args.head_dim * args.partial_rotary_factor), args.rope_theta, args.rope_scaling)

    @property
    def context_length(self) -> int:
        return self.args.max_position_embeddings

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size): what a cache stores per token."""
        return self.args.num_hidden_layers, self.args.num_attention_heads, self.args.hidden_size // self.args.num_attention_heads

    def make_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.args.num_hidden_layers, batch_size)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cache = checked(cache) if cache is not None else self.make_cache(input_ids.shape[0])
        positions = cache.begin(input_ids, attention_mask)         # (B, T)
        h = self.gpt_neox.embed_in(input_ids)                      # (B, T, C)
        cos_sin = self.rope.cos_sin(positions, h.dtype)            # each (B, 1, T, rotary dims)
        for block in self.gpt_neox.layers:
            h = block(h, self.rope, cos_sin, cache)
        return self.embed_out(self.gpt_neox.final_layer_norm(h))  # (B, T, V)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the ``gpt_neox.`` prefix base-model checkpoints lack, accept ``lm_head`` for ``embed_out``, drop
        the mask and rotary buffers old checkpoints carry, tie the output layer when the config says so."""
        out = {}
        for name, w in weights.items():
            if name.endswith((".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")):
                continue
            if name.startswith("lm_head."):
                name = "embed_out." + name[len("lm_head."):]
            elif not name.startswith(("gpt_neox.", "embed_out.")):
                name = "gpt_neox." + name
            out[name] = w
        tie_output(out, "embed_out.weight", "gpt_neox.embed_in.weight", self.args.tie_word_embeddings)   # same tensor: no extra memory
        return out

    def unsanitize(self, weights: dict[str, torch.Tensor], layout: bool = True) -> dict[str, torch.Tensor]:
        """This module's state dict -> checkpoint tensors (the inverse of ``sanitize``): a tied output layer left
        out."""
        out = dict(weights)
        untie(out, "embed_out.weight", self.args.tie_word_embeddings)
        return out
