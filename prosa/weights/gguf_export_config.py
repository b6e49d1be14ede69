"""What GGUF can carry of a model's settings: the architecture check (``EXPORTABLE``, settings llama.cpp and prosa
cannot read back are refused), Llama 3 rope scaling as a ``rope_freqs`` tensor, and the ``{arch}.*`` keys."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, RopeScalingType

from ..errors import UnsupportedModelError

# the reader's rebuild of llama3 rope: what it accepts is exactly what prosa reads back
from .gguf_config import _llama3_rope

EXPORTABLE = ("gpt2", "llama", "mistral", "qwen2")


def _architecture(config: dict[str, Any]):
    """(GGUF architecture name, the model's ``ModelArgs``) after checking GGUF can carry every setting."""
    from ..models import get_module

    kind = config.get("model_type")
    if kind not in EXPORTABLE:
        raise UnsupportedModelError(f"prosa exports {', '.join(EXPORTABLE)} models to GGUF, not {kind!r} "
                                    "(prosa's GGUF reader could not read the file back)")
    args = get_module(kind).ModelArgs.from_dict(config)

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"this {kind} model has {what}, which a GGUF file cannot express as llama.cpp "
                                     f"and prosa read it; prosa exports {kind} models without it")

    if kind == "gpt2":
        if args.activation_function != "gelu_new":
            raise refuse(f"activation_function={args.activation_function!r}")
        if not args.scale_attn_weights or args.scale_attn_by_inverse_layer_idx:
            raise refuse("non-standard attention scaling")
        return "gpt2", args
    if args.hidden_act != "silu" or args.mlp_bias or args.partial_rotary_factor != 1:
        raise refuse("a non-SiLU activation, MLP biases or partial rotary")
    if any((w := args.window(i)) and w < args.max_position_embeddings for i in range(args.num_hidden_layers)):
        raise refuse(f"a sliding attention window ({args.sliding_window} tokens)")
    rope = args.rope_scaling or {}
    keys = {"default": set(), "linear": {"factor"}, "yarn": {"factor", "original_max_position_embeddings"},
            "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}
    if set(rope) - {"rope_type", "type"} != keys.get(rope.get("rope_type", rope.get("type", "default"))):
        raise refuse(f"rope scaling {rope}")
    _rope_freqs(args)
    return ("qwen2" if kind == "qwen2" else "llama"), args


def _rope_freqs(args) -> np.ndarray | None:
    """Llama 3 rope scaling as llama.cpp stores it: a ``rope_freqs`` tensor of per-frequency divisors."""
    rope = args.rope_scaling or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    factor, low, high, old = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"))
    # llama.cpp's convert_hf_to_gguf.py: 1 for short wavelengths, `factor` for long ones, blended between
    wavelen = 2 * math.pi * args.rope_theta ** (np.arange(0, args.head_dim, 2, dtype=np.float32) / args.head_dim)
    smooth = (old / wavelen - low) / (high - low)
    factors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor,
                                                           1 / ((1 - smooth) / factor + smooth))).astype(np.float32)
    try:   # prosa's reader maps the tensor back only for Llama 3's usual parameters
        _llama3_rope(torch.from_numpy(factors), args.rope_theta, args.head_dim)
    except UnsupportedModelError:
        raise UnsupportedModelError(f"this model's llama3 rope scaling {rope} is not Llama 3's own (low 1, high 4, "
                                    "original context 8192), the only one a GGUF file can express") from None
    return factors


def _config_metadata(w: GGUFWriter, arch: str, a) -> None:
    """The ``{arch}.*`` keys prosa's reader and llama.cpp read, as the types llama.cpp expects (uint32, float32)."""
    if arch == "gpt2":
        ints = {"context_length": a.n_positions, "embedding_length": a.n_embd, "block_count": a.n_layer,
                "feed_forward_length": a.n_inner or 4 * a.n_embd, "attention.head_count": a.n_head}
        floats = {"attention.layer_norm_epsilon": a.layer_norm_epsilon}
    else:
        ints = {"context_length": a.max_position_embeddings, "embedding_length": a.hidden_size,
                "block_count": a.num_hidden_layers, "feed_forward_length": a.intermediate_size,
                "attention.head_count": a.num_attention_heads, "attention.head_count_kv": a.num_key_value_heads,
                "rope.dimension_count": a.head_dim, "vocab_size": a.vocab_size}
        if a.head_dim != a.hidden_size // a.num_attention_heads:
            ints.update({"attention.key_length": a.head_dim, "attention.value_length": a.head_dim})
        floats = {"rope.freq_base": a.rope_theta, "attention.layer_norm_rms_epsilon": a.rms_norm_eps}
        rope = a.rope_scaling or {}
        kind = rope.get("rope_type", rope.get("type"))
        if kind in ("linear", "yarn"):
            w.add_rope_scaling_type(RopeScalingType(kind))
            floats["rope.scaling.factor"] = rope["factor"]
        if kind == "yarn":
            ints["rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    for key, value in ints.items():
        w.add_uint32(f"{arch}.{key}", int(value))
    for key, value in floats.items():
        w.add_float32(f"{arch}.{key}", float(value))
