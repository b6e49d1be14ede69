"""GPT-2 (and every fine-tune of it, e.g. Portuguese GPT-2s).

Checkpoint names: ``transformer.{wte,wpe,ln_f}``, ``transformer.h.N.{ln_1,ln_2}``,
``transformer.h.N.attn.{c_attn,c_proj}``, ``transformer.h.N.mlp.{c_fc,c_proj}``; the output layer is tied to
``wte``. The original checkpoints use Conv1D, whose weights are stored (in, out): ``sanitize`` transposes them
once so that the modules here are plain ``nn.Linear`` (and can later be swapped for quantized linears).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import BaseModelArgs, activation, merge_heads, split_heads, tie_output, untie
from .cache import Cache, KVCache, checked

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class ModelArgs(BaseModelArgs):
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads = layer, args.n_head
        self.c_attn = nn.Linear(args.n_embd, 3 * args.n_embd)    # q, k, v stacked on the output dim
        self.c_proj = nn.Linear(args.n_embd, args.n_embd)
        scale = 1 / math.sqrt(args.n_embd // args.n_head) if args.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if args.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.c_attn(x).chunk(3, dim=-1))  # (B, H, T, D)
        return self.c_proj(merge_heads(cache.attend(self.layer, q, k, v, scale=self.scale)))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        inner = args.n_inner or 4 * args.n_embd
        self.c_fc = nn.Linear(args.n_embd, inner)
        self.c_proj = nn.Linear(inner, args.n_embd)
        self.act = activation(args.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args, layer)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), cache)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = nn.ModuleList(Block(args, i) for i in range(args.n_layer))
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)


class Model(nn.Module):
    """GPT-2 causal LM: ``model(input_ids, cache, attention_mask) -> logits (B, T, V)``."""

    TRANSPOSED = _CONV1D    # checkpoint weights stored (in, out)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = GPT2Model(args)
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    @property
    def context_length(self) -> int:
        return self.args.n_positions

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size): what a cache stores per token."""
        return self.args.n_layer, self.args.n_head, self.args.n_embd // self.args.n_head

    def make_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.args.n_layer, batch_size)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cache = checked(cache) if cache is not None else self.make_cache(input_ids.shape[0])
        positions = cache.begin(input_ids, attention_mask)                          # (B, T)
        h = self.transformer.wte(input_ids) + self.transformer.wpe(positions)       # (B, T, C)
        for block in self.transformer.h:
            h = block(h, cache)
        return self.lm_head(self.transformer.ln_f(h))                               # (B, T, V)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the ``transformer.`` prefix base-model checkpoints lack, drop attention-mask buffers, turn Conv1D
        weights into Linear ones, tie the output layer."""
        out = {}
        for name in list(weights):
            w = weights.pop(name)   # popped: a transposed copy replaces it, not joins it
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            if name.endswith(_CONV1D):
                w = w.t().contiguous()
            out[name] = w
        tie_output(out, "lm_head.weight", "transformer.wte.weight", self.args.tie_word_embeddings)   # same tensor: no extra memory
        return out

    def unsanitize(self, weights: dict[str, torch.Tensor], layout: bool = True) -> dict[str, torch.Tensor]:
        """This module's state dict -> checkpoint tensors (the inverse of ``sanitize``): Conv1D weights transposed
        back to (in, out) when ``layout`` (not for names only, e.g. LoRA matrices), a tied output layer left out."""
        out = {name: (w.t().contiguous() if layout and name.endswith(_CONV1D) else w) for name, w in weights.items()}
        untie(out, "lm_head.weight", self.args.tie_word_embeddings)
        return out
