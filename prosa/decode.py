"""The decode step: one new token per sequence through the model, as cheaply as the hardware allows.

``decode_step(model)`` returns a callable ``step(tokens (B, 1), cache) -> logits (B, 1, V)`` that the engine
uses for every token after the prompt. For most models it is the model itself. For the Llama family
(llama, mistral, qwen2) on a CPU with prosa's C++ kernels, given the engine's paged cache (``PagedBatch``: each
row its own length and block table), it is a fused step: each block runs as a single C++
call (``prosa/csrc/qlinear.cpp``, ``LlamaBlock``) instead of ~40 PyTorch operator calls, which is where the time
of small models goes (~0.3 ms of Python and dispatch per block, ~9 ms per token for SmolLM2-135M's 30 blocks,
against ~6 ms for reading its int4 weights once). The fused step computes the same function as the model's
``forward`` (tested against it); the model file stays the readable reference.

The fused step applies when every block is plain (float32 activations; q/k/v and gate/up fused; SiLU; a RoPE
without interleaving) and its linears are float32 ``nn.Linear`` or ``QuantizedLinear`` on the prosa backend;
otherwise ``decode_step`` falls back to the model. ``$PROSA_FUSED=0`` disables it.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from . import quant
from .engine.paged import PagedBatch
from .models.cache import Cache

Step = Callable[[torch.Tensor, Cache], torch.Tensor]


def decode_step(model: nn.Module) -> Step:
    """The fastest available ``step(tokens (B, 1), cache) -> logits (B, 1, V)`` for ``model``.

    The fused step is built once per model and kept on it (``model._prosa_fused``). It holds the model's weight
    tensors themselves, so in-place updates reach it; swapping layers (``quantize_model``), replacing or moving
    tensors (``load_state_dict(assign=True)``, ``model.to(...)``) or switching activations rebuilds it.
    """
    if os.environ.get("PROSA_FUSED") == "0":
        return model
    key = (tuple((id(m), getattr(m, "activations", None)) for m in model.modules()),
           tuple(t.data_ptr() for t in model.state_dict().values()))
    cached = getattr(model, "_prosa_fused", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    step = _build_llama(model) or model
    object.__setattr__(model, "_prosa_fused", (key, step))   # plain attribute: not a submodule, not saved
    return step


def _lin(ext, mod: nn.Module):
    """The C++ view of a linear layer, or None when it has no fused form."""
    if isinstance(mod, quant.QuantizedLinear):
        if mod.backend != "prosa":
            return None
        b = mod._buffers
        return ext.Lin(b["qweight"], b["scales"], b.get("mins"), b["bias"], None, mod.out_features, mod.group_size,
                       mod.bits, mod.activations == "int8")
    if type(mod) is nn.Linear and mod.weight.dtype == torch.float32:
        empty = torch.empty(0)
        bias = None if mod.bias is None else mod.bias.detach()
        return ext.Lin(empty, empty, None, bias, mod.weight.detach(), mod.out_features, 0, 0)
    return None


def _build_llama(model: nn.Module) -> Step | None:
    from .models import llama

    if not isinstance(model, llama.Model):
        return None
    ext = quant.kernels()
    args = model.args
    emb = model.model.embed_tokens.weight
    if ext is None or not hasattr(ext, "LlamaBlock") or emb.device.type != "cpu" or emb.dtype != torch.float32:
        return None
    if args.hidden_act not in ("silu", "swish") or model.rope.interleaved:
        return None
    blocks = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        lins = [_lin(ext, m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(x is None for x in lins) or any(n.dtype != torch.float32 for n in norms):
            return None
        blocks.append(ext.LlamaBlock(norms[0].detach(), norms[1].detach(), *lins, attn.n_heads, attn.n_kv,
                                     args.head_dim, model.rope.dims, attn.window or 0, args.intermediate_size,
                                     float(layer.input_layernorm.eps)))
    return _FusedLlama(model, blocks)


class _FusedLlama:
    """``step(tokens, cache)`` for a Llama-family model, one C++ call per block on the engine's paged cache."""

    def __init__(self, model: nn.Module, blocks: list):
        self.model, self.blocks = model, blocks

    def __call__(self, tokens: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        m = self.model
        if tokens.shape[1] != 1 or attention_mask is not None or not isinstance(cache, PagedBatch):
            return m(tokens, cache, attention_mask)        # prompts and other caches go through the model
        positions = cache.begin(tokens)                    # (B, 1)
        x = m.model.embed_tokens(tokens[:, 0]).contiguous()  # (B, C), a fresh tensor the blocks update in place
        cos, sin = m.rope.cos_sin(positions, torch.float32)  # (B, 1, 1, rot) each
        cos, sin = cos.reshape(len(x), -1).contiguous(), sin.reshape(len(x), -1).contiguous()
        pos = positions[:, 0].contiguous()                 # (B,) the slot each row writes, in its own blocks
        pool = cache.pool
        for i, block in enumerate(self.blocks):
            x = block.forward(x, pool.keys[i], pool.values[i], cache.table, pos, pool.block_size, cos, sin)
        return m.lm_head(m.model.norm(x))[:, None]        # (B, 1, V)
