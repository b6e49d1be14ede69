"""GPT-Neo (EleutherAI 125M / 1.3B / 2.7B): GPT-2 with learned positions, alternating global and local
(sliding-window) attention layers, and unscaled attention scores.

Checkpoint names: ``transformer.{wte,wpe,ln_f}``, ``transformer.h.N.{ln_1,ln_2}``,
``transformer.h.N.attn.attention.{q,k,v}_proj`` (no bias), ``transformer.h.N.attn.attention.out_proj``,
``transformer.h.N.mlp.{c_fc,c_proj}``; the output layer ``lm_head`` is tied to ``wte``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CorruptModelError
from .base import BaseModelArgs, activation, merge_heads, split_heads, tie_output, untie
from .cache import Cache, KVCache, checked


def expand_attention_types(attention_types: list) -> list[str]:
    """``[[["global", "local"], 12]]`` -> ``["global", "local"] * 12`` (one entry per layer)."""
    return [kind for kinds, repeat in attention_types for _ in range(repeat) for kind in kinds]


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    vocab_size: int
    num_layers: int | None = None
    num_heads: int | None = None
    num_hidden_layers: int | None = None      # alias of num_layers
    num_attention_heads: int | None = None    # alias of num_heads
    attention_types: list | None = None
    window_size: int = 256
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True

    def __post_init__(self):
        self.num_layers = self.num_layers or self.num_hidden_layers
        self.num_heads = self.num_heads or self.num_attention_heads
        self.intermediate_size = self.intermediate_size or 4 * self.hidden_size
        self.attention_types = self.attention_types or [[["global", "local"], self.num_layers // 2]]
        layers = expand_attention_types(self.attention_types)
        if len(layers) != self.num_layers or set(layers) - {"global", "local"}:
            raise CorruptModelError(f"config.json: attention_types {self.attention_types} does not give 'global' or "
                                    f"'local' for each of the {self.num_layers} layers")
        self.attention_layers = layers

    def window(self, layer: int) -> int | None:
        """Sliding-window size of ``layer``, or None for global attention."""
        return self.window_size if self.attention_layers[layer] == "local" else None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.window = layer, args.num_heads, args.window(layer)
        c = args.hidden_size
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.n_heads)                      # (B, H, T, D)
        k = split_heads(self.k_proj(x), self.n_heads)
        v = split_heads(self.v_proj(x), self.n_heads)
        # GPT-Neo never scales the scores by 1/sqrt(D), and computes attention in float32.
        out = cache.attend(self.layer, q, k, v, window=self.window, scale=1.0, upcast=True)   # (B, H, T, D)
        return self.out_proj(merge_heads(out))                             # (B, T, C)


class AttentionLayer(nn.Module):
    """Holds the attention under ``attn.attention`` as the checkpoints name it."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention = Attention(args, layer)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        return self.attention(x, cache)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.c_fc = nn.Linear(args.hidden_size, args.intermediate_size)
        self.c_proj = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = activation(args.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.attn = AttentionLayer(args, layer)
        self.ln_2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), cache)
        return h + self.mlp(self.ln_2(h))


class GPTNeoModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.hidden_size)
        self.wpe = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.h = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.ln_f = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)


class Model(nn.Module):
    """GPT-Neo causal LM: ``model(input_ids, cache, attention_mask) -> logits (B, T, V)``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = GPTNeoModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def context_length(self) -> int:
        return self.args.max_position_embeddings

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size): what a cache stores per token."""
        return self.args.num_layers, self.args.num_heads, self.args.hidden_size // self.args.num_heads

    def make_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.args.num_layers, batch_size)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cache = checked(cache) if cache is not None else self.make_cache(input_ids.shape[0])
        positions = cache.begin(input_ids, attention_mask)                          # (B, T)
        h = self.transformer.wte(input_ids) + self.transformer.wpe(positions)       # (B, T, C)
        for block in self.transformer.h:
            h = block(h, cache)
        return self.lm_head(self.transformer.ln_f(h))                               # (B, T, V)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the ``transformer.`` prefix base-model checkpoints lack, drop the causal-mask buffers old
        checkpoints carry, tie the output layer."""
        out = {}
        for name, w in weights.items():
            if name.endswith((".attn.attention.bias", ".attn.attention.masked_bias")):
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            out[name] = w
        tie_output(out, "lm_head.weight", "transformer.wte.weight", self.args.tie_word_embeddings)   # same tensor: no extra memory
        return out

    def unsanitize(self, weights: dict[str, torch.Tensor], layout: bool = True) -> dict[str, torch.Tensor]:
        """This module's state dict -> checkpoint tensors (the inverse of ``sanitize``): a tied output layer left
        out."""
        out = dict(weights)
        untie(out, "lm_head.weight", self.args.tie_word_embeddings)
        return out
