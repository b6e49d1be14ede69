"""The decode step: one new token per sequence through the model, as cheaply as the hardware allows.

``decode_step(model)`` returns a callable ``step(tokens (B, 1), cache) -> logits (B, 1, V)`` that the engine
uses for every token after the prompt. For most models it is the model itself. For the Llama family
(llama, mistral, qwen2) and the GPT-2 family (gpt2, gpt_neo, gptj, gpt_neox) on a CPU with prosa's C++ kernels,
given the engine's paged cache (``PagedBatch``: each row its own length and block table), it is a fused step:
each block runs as a single C++ call (``prosa/csrc/qlinear.cpp``, ``LlamaBlock`` / ``GptBlock``) instead of
~40 PyTorch operator calls, which is where the time of small models goes (~0.3 ms of Python and dispatch per
block, ~9 ms per token for SmolLM2-135M's 30 blocks, against ~6 ms for reading its int4 weights once). The fused
step computes the same function as the model's ``forward`` (tested against it); the model file stays the
readable reference.

The fused step applies when every block is plain (float32 activations; float32 norms; for the Llama family q/k/v
and gate/up fused, SiLU and a RoPE without interleaving; for the GPT-2 family a GELU, ReLU or SiLU MLP) and its
linears are float32 ``nn.Linear`` or ``QuantizedLinear`` on the prosa backend; otherwise ``decode_step`` falls
back to the model. ``$PROSA_FUSED=0`` disables it.
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
           tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())))
    cached = getattr(model, "_prosa_fused", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    step = _build_llama(model) or _build_gpt(model) or model
    object.__setattr__(model, "_prosa_fused", (key, step))   # plain attribute: not a submodule, not saved
    return step


def _cpu_float32(embedding: nn.Module) -> bool:
    """Whether an embedding (``nn.Embedding`` or a GGUF ``QuantizedEmbedding``) gives float32 rows on the CPU."""
    held = embedding.weight if isinstance(embedding, nn.Embedding) else embedding.blocks
    return held.device.type == "cpu" and getattr(embedding, "dtype", held.dtype) == torch.float32


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
    emb = model.model.embed_tokens
    if ext is None or not hasattr(ext, "LlamaBlock") or not _cpu_float32(emb):
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
    inner = model.model
    return _Fused(model, blocks, lambda tok, pos: inner.embed_tokens(tok), model.rope,
                  lambda x: model.lm_head(inner.norm(x)))


# activation name (``activation_function`` / ``hidden_act``) -> GptBlock's code; others fall back to the model
_ACTS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "gelu": 1, "relu": 2, "silu": 3, "swish": 3}


def _gpt_parts(model: nn.Module):
    """A GPT-2-family model as (blocks' parts, embed, rope, head, activation name), or None for other models.

    Each block's parts: (ln1, ln2 or None, [fused q/k/v] or [q, k, v], out, fc_in, fc_out, per_head, parallel,
    scale, window)."""
    from .models import gpt2, gpt_neo, gpt_neox, gptj

    if isinstance(model, gpt2.Model):
        t = model.transformer
        parts = [(b.ln_1, b.ln_2, [b.attn.c_attn], b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj, False, False,
                  b.attn.scale, 0) for b in t.h]
        embed = lambda tok, pos: t.wte(tok) + t.wpe(pos)                       # noqa: E731
        return parts, embed, None, lambda x: model.lm_head(t.ln_f(x)), model.args.activation_function
    if isinstance(model, gpt_neo.Model):
        t = model.transformer
        parts = []
        for b in t.h:
            a = b.attn.attention
            parts.append((b.ln_1, b.ln_2, [a.q_proj, a.k_proj, a.v_proj], a.out_proj, b.mlp.c_fc, b.mlp.c_proj,
                          False, False, 1.0, a.window or 0))                   # GPT-Neo never scales its scores
        embed = lambda tok, pos: t.wte(tok) + t.wpe(pos)                       # noqa: E731
        return parts, embed, None, lambda x: model.lm_head(t.ln_f(x)), model.args.activation_function
    if isinstance(model, gptj.Model):
        t, d = model.transformer, model.args.head_dim
        parts = [(b.ln_1, None, [b.attn.q_proj, b.attn.k_proj, b.attn.v_proj], b.attn.out_proj, b.mlp.fc_in,
                  b.mlp.fc_out, False, True, d ** -0.5, 0) for b in t.h]
        return (parts, lambda tok, pos: t.wte(tok), model.rope, lambda x: model.lm_head(t.ln_f(x)),
                model.args.activation_function)
    if isinstance(model, gpt_neox.Model):
        t, d = model.gpt_neox, model.args.head_dim
        parts = [(b.input_layernorm, b.post_attention_layernorm, [b.attention.query_key_value], b.attention.dense,
                  b.mlp.dense_h_to_4h, b.mlp.dense_4h_to_h, True, b.parallel, d ** -0.5, 0) for b in t.layers]
        return (parts, lambda tok, pos: t.embed_in(tok), model.rope, lambda x: model.embed_out(t.final_layer_norm(x)),
                model.args.hidden_act)
    return None


def _bias(norm: nn.LayerNorm | None) -> torch.Tensor | None:
    return None if norm is None or norm.bias is None else norm.bias.detach()


def _build_gpt(model: nn.Module) -> Step | None:
    found = _gpt_parts(model)
    if found is None:
        return None
    parts, embed, rope, head, act = found
    ext = quant.kernels()
    ln = parts[0][0]
    if (ext is None or not hasattr(ext, "GptBlock") or act not in _ACTS or ln.weight.device.type != "cpu"
            or (rope is not None and rope.interleaved and rope.dims % 2)):
        return None
    rope_kind = 0 if rope is None else (2 if rope.interleaved else 1)
    heads, head_dim = model.kv_shape[1:]
    blocks = []
    for ln1, ln2, qkv, out, fc_in, fc_out, per_head, parallel, scale, window in parts:
        lins = [_lin(ext, m) for m in (*qkv, out, fc_in, fc_out)]
        norms = [n for n in (ln1, ln2) if n is not None]
        if (any(x is None for x in lins) or any(type(n) is not nn.LayerNorm or n.weight.dtype != torch.float32
                                                 for n in norms) or norms[-1].eps != ln1.eps):
            return None
        blocks.append(ext.GptBlock(ln1.weight.detach(), _bias(ln1), None if ln2 is None else ln2.weight.detach(),
                                   _bias(ln2), lins[:-3], *lins[-3:], heads, head_dim,
                                   0 if rope is None else rope.dims, rope_kind, window, float(scale), _ACTS[act],
                                   per_head, parallel, float(ln1.eps)))
    return _Fused(model, blocks, embed, rope, head)


class _Fused:
    """``step(tokens, cache)``: one C++ call per block on the engine's paged cache.

    Args:
        model: the model (prompts and other caches go through its forward).
        blocks: the C++ blocks (``LlamaBlock`` / ``GptBlock``), in order.
        embed: (tokens (B,), positions (B,)) -> the blocks' input (B, C).
        rope: the model's RoPE, or None (learned positions, added by ``embed``).
        head: the last hidden states (B, C) -> logits (B, V).
    """

    def __init__(self, model: nn.Module, blocks: list, embed: Callable, rope, head: Callable):
        self.model, self.blocks, self.embed, self.rope, self.head = model, blocks, embed, rope, head

    def __call__(self, tokens: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        m = self.model
        if tokens.shape[1] != 1 or attention_mask is not None or not isinstance(cache, PagedBatch):
            return m(tokens, cache, attention_mask)        # prompts and other caches go through the model
        positions = cache.begin(tokens)                    # (B, 1)
        pos = positions[:, 0].contiguous()                 # (B,) the slot each row writes, in its own blocks
        x = self.embed(tokens[:, 0], pos).contiguous()     # (B, C), a fresh tensor the blocks update in place
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(positions, torch.float32)   # (B, 1, 1, rot) each
            cos, sin = cos.reshape(len(x), -1).contiguous(), sin.reshape(len(x), -1).contiguous()
        else:
            cos = sin = _EMPTY
        pool = cache.pool
        for i, block in enumerate(self.blocks):
            x = block.forward(x, pool.keys[i], pool.values[i], cache.table, pos, pool.block_size, cos, sin)
        return self.head(x)[:, None]                       # (B, 1, V)


_EMPTY = torch.empty(0)
