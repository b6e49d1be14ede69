"""GPT-J (EleutherAI GPT-J-6B and its fine-tunes): attention and MLP in parallel off one LayerNorm, rotary
embeddings on the first ``rotary_dim`` channels of each head, rotating interleaved channel pairs.

Checkpoint names: ``transformer.{wte,ln_f}``, ``transformer.h.N.ln_1``,
``transformer.h.N.attn.{q,k,v,out}_proj`` (no bias), ``transformer.h.N.mlp.{fc_in,fc_out}``, ``lm_head``
(with bias, not tied).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import BaseModelArgs, RoPE, activation, merge_heads, split_heads, tie_output, untie
from .cache import Cache, KVCache, checked


@dataclass
class ModelArgs(BaseModelArgs):
    vocab_size: int
    n_embd: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_positions: int | None = None
    hidden_size: int | None = None              # aliases of the four above (transformers' attribute_map)
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    rotary_dim: int | None = 64
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.n_embd = self.n_embd or self.hidden_size
        self.n_layer = self.n_layer or self.num_hidden_layers
        self.n_head = self.n_head or self.num_attention_heads
        self.n_positions = self.n_positions or self.max_position_embeddings or 2048
        self.n_inner = self.n_inner or 4 * self.n_embd
        self.head_dim = self.n_embd // self.n_head
        self.rotary_dim = self.rotary_dim or self.head_dim


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads = layer, args.n_head
        c = args.n_embd
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.out_proj = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor, rope: RoPE, cos_sin, cache: Cache) -> torch.Tensor:
        q = rope.apply(split_heads(self.q_proj(x), self.n_heads), *cos_sin)   # (B, H, T, D)
        k = rope.apply(split_heads(self.k_proj(x), self.n_heads), *cos_sin)
        v = split_heads(self.v_proj(x), self.n_heads)
        return self.out_proj(merge_heads(cache.attend(self.layer, q, k, v)))   # (B, T, C)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc_in = nn.Linear(args.n_embd, args.n_inner)
        self.fc_out = nn.Linear(args.n_inner, args.n_embd)
        self.act = activation(args.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args, layer)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: RoPE, cos_sin, cache: Cache) -> torch.Tensor:
        h = self.ln_1(x)                       # one norm feeds both branches, which run in parallel
        return x + self.attn(h, rope, cos_sin, cache) + self.mlp(h)


class GPTJModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.h = nn.ModuleList(Block(args, i) for i in range(args.n_layer))
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)


class Model(nn.Module):
    """GPT-J causal LM: ``model(input_ids, cache, attention_mask) -> logits (B, T, V)``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = GPTJModel(args)
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size)
        # GPT-J's sinusoids use base 10000 and rotate pairs (0,1), (2,3)... of the first rotary_dim channels.
        self.rope = RoPE(args.rotary_dim, 10000.0, interleaved=True)

    @property
    def context_length(self) -> int:
        return self.args.n_positions

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size): what a cache stores per token."""
        return self.args.n_layer, self.args.n_head, self.args.head_dim

    def make_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.args.n_layer, batch_size)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cache = checked(cache) if cache is not None else self.make_cache(input_ids.shape[0])
        positions = cache.begin(input_ids, attention_mask)        # (B, T)
        h = self.transformer.wte(input_ids)                       # (B, T, C)
        cos_sin = self.rope.cos_sin(positions, h.dtype)           # each (B, 1, T, rotary_dim)
        for block in self.transformer.h:
            h = block(h, self.rope, cos_sin, cache)
        return self.lm_head(self.transformer.ln_f(h))             # (B, T, V)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the ``transformer.`` prefix base-model checkpoints lack, drop the causal-mask buffers old
        checkpoints carry; a tied (or missing) output layer reuses ``wte`` with a zero bias."""
        out = {}
        for name, w in weights.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            out[name] = w
        tie_output(out, "lm_head.weight", "transformer.wte.weight", self.args.tie_word_embeddings)
        if "lm_head.weight" in out and "lm_head.bias" not in out:
            out["lm_head.bias"] = out["lm_head.weight"].new_zeros(out["lm_head.weight"].shape[0])
        return out

    def unsanitize(self, weights: dict[str, torch.Tensor], layout: bool = True) -> dict[str, torch.Tensor]:
        """This module's state dict -> checkpoint tensors (the inverse of ``sanitize``): a tied output layer (and
        the zero bias ``sanitize`` gave it) left out."""
        out = dict(weights)
        if self.args.tie_word_embeddings:
            untie(out, "lm_head.weight", True)
            out.pop("lm_head.bias", None)
        return out
