"""GGUF architectures: llama.cpp's tensor names -> Hugging Face names per architecture, and the ``{arch}.*``
metadata keys -> a HF ``config.json`` dict (Llama 3's ``rope_freqs`` tensor included)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from prosa.errors import UnsupportedModelError

from .ggml_types import GGMLType as Q
from .gguf_dequant import _FLOAT
from .gguf_format import _TensorInfo, _corrupt

# GGUF tensor name -> HF name, per architecture: "blk.N.<part>" -> f"{layers}.N.{block[part]}", else top[name].
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_BLOCK = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc",
               "ffn_down": "mlp.c_proj", "attn_norm": "ln_1", "ffn_norm": "ln_2"}


class _Arch(NamedTuple):
    model_type: str
    hf_class: str
    top: dict[str, str]
    block: dict[str, str]
    layers: str
    permute_qk: bool = False  # llama.cpp's llama converter reorders Q/K rows for its rope kernel
    transposed: frozenset[str] = frozenset()  # HF GPT-2 uses Conv1D: (in, out) weights


ARCHS = {
    "llama": _Arch("llama", "LlamaForCausalLM", _LLAMA_TOP, _LLAMA_BLOCK, "model.layers", permute_qk=True),
    # qwen2 files keep HF's row order (its converter does not permute) and have q/k/v biases
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _LLAMA_TOP, _LLAMA_BLOCK, "model.layers"),
    "gpt2": _Arch("gpt2", "GPT2LMHeadModel", _GPT2_TOP, _GPT2_BLOCK, "transformer.h",
                  transposed=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})),
}


def _hf_name(arch: _Arch, name: str) -> tuple[str, str] | None:
    """GGUF tensor name -> (HF name, GGUF part such as "attn_q"), or None for a name this arch does not have."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        return (f"{arch.layers}.{m[1]}.{arch.block[m[2]]}.{m[3]}", m[2]) if m[2] in arch.block else None
    if m := re.fullmatch(r"(\w+)\.(weight|bias)", name):
        return (f"{arch.top[m[1]]}.{m[2]}", m[1]) if m[1] in arch.top else None
    return None


def _llama3_rope(factors: torch.Tensor, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1+ files store rope scaling as a ``rope_freqs`` tensor (one divisor per frequency), not as HF's
    ``rope_scaling``. The factor is the largest divisor; the other parameters have been the same in every Llama 3.x
    release, and must reproduce the tensor."""
    factor, low, high, original = float(factors.max()), 1.0, 4.0, 8192
    wavelen = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    expected = torch.where(wavelen < original / high, 1.0,
                           torch.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not torch.allclose(factors.double(), expected, rtol=1e-4):
        raise UnsupportedModelError("this GGUF's rope_freqs tensor is not Llama 3 rope scaling with the usual "
                                    "parameters; prosa cannot map it to a rope_scaling config.")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


def _config(path: Path, md: dict[str, Any], arch_name: str, tensors: dict[str, _TensorInfo],
            rope_freqs: torch.Tensor | None) -> dict[str, Any]:
    """The HF ``config.json`` for this file, from llama.cpp's ``{arch}.*`` metadata keys."""
    def key(name: str, default: Any = KeyError) -> Any:
        value = md.get(f"{arch_name}.{name}", default)
        if value is KeyError:
            raise _corrupt(path, f"metadata key {arch_name}.{name} is missing")
        return value

    # the embedding matrix is what the model is built around; the vocab_size key is optional in GGUF
    vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else key("vocab_size")
    # like transformers: a half-precision file runs in its half type, a quantized one in float32
    types = {t.ggml_type for t in tensors.values()}
    half = types - {Q.F32} if types <= set(_FLOAT) else set()
    config = {"architectures": [ARCHS[arch_name].hf_class], "model_type": arch_name, "vocab_size": vocab,
              "tie_word_embeddings": "output.weight" not in tensors,
              "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
              "torch_dtype": "bfloat16" if Q.BF16 in half else "float16" if half else "float32"}
    if "tokenizer.ggml.padding_token_id" in md:
        config["pad_token_id"] = md["tokenizer.ggml.padding_token_id"]
    hidden, heads, context = key("embedding_length"), key("attention.head_count"), key("context_length")
    if arch_name == "gpt2":
        return {**config, "n_embd": hidden, "n_layer": key("block_count"), "n_head": heads, "n_positions": context,
                "n_ctx": context, "n_inner": key("feed_forward_length", 4 * hidden),
                "layer_norm_epsilon": key("attention.layer_norm_epsilon"), "activation_function": "gelu_new"}

    head_dim, theta = key("attention.key_length", hidden // heads), float(key("rope.freq_base", 10000.0))
    kind, rope_scaling = key("rope.scaling.type", None), None
    if kind in ("linear", "yarn"):
        rope_scaling = {"rope_type": kind, "factor": float(key("rope.scaling.factor"))}
        if kind == "yarn":
            rope_scaling["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    elif kind not in (None, "none"):
        raise UnsupportedModelError(f"{path} uses rope scaling {kind!r}; prosa supports linear, yarn and llama3.")
    if rope_freqs is not None and not bool((rope_freqs == 1).all()):
        rope_scaling = _llama3_rope(rope_freqs, theta, head_dim)
    config.update(
        hidden_size=hidden, intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
        num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads), head_dim=head_dim,
        hidden_act="silu", max_position_embeddings=context, rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_theta=theta, rope_scaling=rope_scaling, mlp_bias=False,
        attention_bias="blk.0.attn_q.bias" in tensors)
    if arch_name == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    return config
