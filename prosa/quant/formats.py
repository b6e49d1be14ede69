"""The plain quantized formats: integers plus float16 scales (and mins) per group of inputs of a row.

- int8 symmetric (``quantize_int8``): ``W = d * q``, q in -127..127, one fp16 ``d`` per ``group_size`` inputs of a
  row (``group_size = in_features`` is per-channel). GGUF's Q8_0 is this format with groups of 32.
- int4 (``quantize_int4``): ``W = d * q + m``, q in 0..15 (asymmetric: scale and min per group), fp16 ``d`` and
  ``m``. GGUF's Q4_0 (``m = -8 d``) and Q4_1 are this format with groups of 32.
- int8 asymmetric (``quantize_uint8``): ``W = d * q + m``, q in 0..255; prosa's default int8.

``dequantize_int`` inverts all three. Every other form (the kernels' packed layouts, ``layout.py``) is built from
these tensors and can give them back (``QuantizedLinear.to_int``).
"""
from __future__ import annotations

import torch

def _check_groups(k: int, group_size: int) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={group_size}")


_CHUNK = 1 << 20   # weights quantized per step: bounds the float temporaries to a few MB whatever the layer


def _row_chunks(n: int, k: int):
    """Row slices of about ``_CHUNK`` weights each."""
    step = max(1, _CHUNK // max(k, 1))
    return (slice(r, min(n, r + step)) for r in range(0, n, step))


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: ``w ~= d * q`` per group of ``group_size`` inputs (None: per output channel).

    Returns:
        q int8 (N, K) in -127..127, d float16 (N, K // group_size).
    """
    n, k = w.shape
    g = group_size or k
    _check_groups(k, g)
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    d = torch.empty(n, k // g, dtype=torch.float16, device=w.device)
    for rows in _row_chunks(n, k):
        wg = w[rows].detach().float().reshape(-1, k // g, g)
        d[rows] = (wg.abs().amax(-1) / 127).to(torch.float16)
        d32 = d[rows].float()
        inv = torch.where(d32 > 0, 1 / d32, torch.zeros_like(d32))
        q[rows] = torch.round(wg * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(-1, k)
    return q, d


def _quantize_asym(w: torch.Tensor, group_size: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w ~= d * q + m`` per group, q in 0..levels, ``m`` the group minimum, ``d = (max - min) / levels``."""
    n, k = w.shape
    _check_groups(k, group_size)
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    d = torch.empty(n, k // group_size, dtype=torch.float16, device=w.device)
    m = torch.empty_like(d)
    for rows in _row_chunks(n, k):
        wg = w[rows].detach().float().reshape(-1, k // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        d[rows] = ((hi - lo) / levels).to(torch.float16)
        m[rows] = lo.to(torch.float16)
        d32 = d[rows].float()
        inv = torch.where(d32 > 0, 1 / d32, torch.zeros_like(d32))
        wg = (wg - m[rows].float()[..., None]).mul_(inv[..., None])   # a new tensor: in place is safe
        q[rows] = torch.round(wg).clamp_(0, levels).to(torch.uint8).reshape(-1, k)
    return q, d, m


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4: ``w ~= d * q + m`` per group, q in 0..15, ``m`` the group minimum.

    Returns:
        q uint8 (N, K) in 0..15, d float16 (N, K // g), m float16 (N, K // g).
    """
    return _quantize_asym(w, group_size, 15)


def quantize_uint8(w: torch.Tensor, group_size: int | None = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8: ``w ~= d * q + m`` per group, q in 0..255 (None: per output channel).

    Up to twice as fine as symmetric int8 on groups that are not centred on zero, and exact on weights that were
    Q4_0/Q4_1 blocks (their 16 levels land on every 17th code). The default int8 format.

    Returns:
        q uint8 (N, K) in 0..255, d float16 (N, K // g), m float16 (N, K // g).
    """
    return _quantize_asym(w, group_size or w.shape[1], 255)


def dequantize_int(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """``d * q (+ m)`` with d/m broadcast over their groups; computed in float32."""
    n, k = q.shape
    g = k // d.shape[1]
    w = q.float().reshape(n, -1, g) * d.float()[..., None]
    if m is not None:
        w = w + m.float()[..., None]
    return w.reshape(n, k).to(dtype)
