"""Shared pieces of every architecture: config parsing, rotary embeddings, attention.

Config enters here once: ``BaseModelArgs.from_dict`` takes a Hugging Face ``config.json`` dict (old and new
transformers spellings alike) and ignores keys the architecture does not use.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError


def normalize_rope_config(params: dict[str, Any]) -> dict[str, Any]:
    """Flatten the RoPE settings of any transformers version into ``rope_theta``, ``rope_scaling`` and
    ``partial_rotary_factor`` keys.

    transformers >= 5 writes ``rope_parameters = {"rope_theta", "rope_type", "factor", "partial_rotary_factor"...}``;
    older versions write ``rope_theta`` + ``rope_scaling`` (and GPT-NeoX ``rotary_emb_base`` + ``rotary_pct``).
    """
    out = dict(params)
    rp = params.get("rope_parameters")
    if isinstance(rp, dict):
        # Per-layer-type dicts ({"full_attention": {...}}) are not used by the families we run natively.
        rp = dict(rp)
        if "rope_theta" in rp:
            out["rope_theta"] = rp.pop("rope_theta")
        if "partial_rotary_factor" in rp:
            out["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
        out["rope_scaling"] = rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None
    if "rotary_emb_base" in params and "rope_theta" not in out:
        out["rope_theta"] = params["rotary_emb_base"]
    if "rotary_pct" in params and "partial_rotary_factor" not in out:
        out["partial_rotary_factor"] = params["rotary_pct"]
    return out


@dataclass
class BaseModelArgs:
    """Base of every ``ModelArgs``: built from a config.json dict, unknown keys ignored."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "BaseModelArgs":
        """Args from a Hugging Face config dict (unknown keys ignored)."""
        params = normalize_rope_config(params)
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})


def rope_inv_freq(dims: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """Inverse frequencies (dims // 2,) in float32, with ``linear`` or ``llama3`` scaling applied.

    Computed exactly as transformers does (float32, ``theta ** (arange(0, dims, 2) / dims)``) so that
    logits match to ~1e-6.
    """
    inv = 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.int64, device=device).float() / dims))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported natively (supported: default, linear, llama3)")


class RoPE:
    """Rotary position embedding on the first ``dims`` channels of each head.

    Not an ``nn.Module`` and holds no buffers: models are built on the meta device and the frequencies are
    made lazily, on the device of the positions, the first time they are needed.

    Args:
        dims: rotated channels per head (``rotary_dim``, or ``head_dim * partial_rotary_factor``).
        theta: base of the frequencies.
        scaling: the ``rope_scaling`` dict or None.
        interleaved: rotate channel pairs (0,1),(2,3)... (GPT-J) instead of halves (Llama, NeoX).
    """

    def __init__(self, dims: int, theta: float = 10000.0, scaling: dict | None = None, interleaved: bool = False):
        self.dims, self.theta, self.scaling, self.interleaved = dims, theta, scaling, interleaved
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            # Checked here, at build time, so that load() can fall back to transformers.
            raise UnsupportedModelError(
                f"rope scaling type {kind!r} is not supported natively (supported: default, linear, llama3)")
        self._inv_freq: torch.Tensor | None = None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` (B, T), each (B, 1, T, dims) in ``dtype``; computed once per forward."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.dims, self.theta, self.scaling, positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # (B, T, dims/2)
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, H, T, D); channels past ``dims`` pass through."""
        d = self.dims
        rot, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
        if self.interleaved:
            x1, x2 = rot[..., ::2], rot[..., 1::2]
            rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            x1, x2 = rot[..., : d // 2], rot[..., d // 2:]
            rotated = torch.cat((-x2, x1), dim=-1)
        out = rot * cos + rotated * sin
        return out if rest is None else torch.cat((out, rest), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: (B, H, T, D); k, v: (B, H_kv, S, D) with H a multiple of H_kv.
        mask: bool (B, 1, T, S), True = may attend; None = every key allowed (no padding, T == 1).
        scale: logit scale; None means 1/sqrt(D).
    Returns:
        (B, H, T, D)
    """
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)"""
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    """The activation function a config names (``activation_function`` / ``hidden_act``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})") from None


def tie_output(weights: dict[str, torch.Tensor], out: str, embed: str, tied: bool) -> None:
    """Point the output layer ``out`` at the embedding ``embed`` (the same tensor: no copy) when the model ties
    them or the checkpoint has no output layer. A no-op on a slice of a checkpoint without the embedding: the
    loader sanitizes a checkpoint one layer at a time (``prosa.weights.assemble``)."""
    if embed in weights and (tied or out not in weights):
        weights[out] = weights[embed]


def fuse(weights: dict[str, torch.Tensor], fused: dict[str, tuple[str, ...]], layers: str, n_layers: int) -> None:
    """Concatenate checkpoint projections row-wise into fused ones (e.g. q/k/v -> ``qkv_proj``), in place.

    Args:
        fused: target suffix -> its parts' suffixes, under ``{layers}.{i}.``; weights and biases alike. Layers whose
            parts are absent (another slice of the checkpoint, or parts the loader already quantized) are skipped.
    """
    for i in range(n_layers):
        for target, parts in fused.items():
            for kind in ("weight", "bias"):
                names = [f"{layers}.{i}.{part}.{kind}" for part in parts]
                if all(n in weights for n in names):
                    weights[f"{layers}.{i}.{target}.{kind}"] = torch.cat([weights.pop(n) for n in names])



def unfuse(weights: dict[str, torch.Tensor], sizes: dict[str, tuple[tuple[str, int], ...]], layers: str,
           n_layers: int) -> None:
    """The inverse of ``fuse``, in place: split fused projections back into the checkpoint's parts by rows.

    Args:
        sizes: fused suffix -> ((part suffix, rows), ...) in the order they were concatenated.
    """
    for i in range(n_layers):
        for target, parts in sizes.items():
            for kind in ("weight", "bias"):
                name = f"{layers}.{i}.{target}.{kind}"
                if name in weights:
                    pieces = weights.pop(name).split([rows for _, rows in parts])
                    for (part, _), piece in zip(parts, pieces):
                        weights[f"{layers}.{i}.{part}.{kind}"] = piece


def untie(weights: dict[str, torch.Tensor], out: str, tied: bool) -> None:
    """Drop the output layer a tied checkpoint does not store (its loader re-ties it to the embedding)."""
    if tied:
        weights.pop(out, None)
