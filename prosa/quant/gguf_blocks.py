"""GGUF's quantized blocks -> the plain format of ``formats.py``, without going through float.

Q8_0 (int8, group 32), Q4_0 (int4, group 32, ``m = -8 d``) and Q4_1 (int4, group 32, ``d`` and ``m``) are the
plain formats exactly; Q4_K's per-32 scales and mins are rounded to float16 (~0.02% of each weight).
"""
from __future__ import annotations

import numpy as np
import torch

def gguf_to_int(raw, ggml_type, shape: tuple[int, int]):
    """GGUF Q8_0 / Q4_0 / Q4_1 blocks -> ``(bits, q, d, m)`` in the plain format of formats.py, exactly; Q4_K blocks
    too, with their per-32 scales and mins (``d * sc`` and ``dmin * m``, exact in float32) rounded to float16.

    Args:
        raw: the tensor's bytes (uint8 numpy array or tensor, any shape; e.g. ``ReaderTensor.data``).
        ggml_type: a ``gguf.GGMLQuantizationType`` (or its int / name).
        shape: (rows, cols) in torch order.
    Returns:
        bits (8 or 4), q (int8 for Q8_0, uint8 0..15 for Q4_x; shape ``shape``), d and m float16 (rows, cols // 32);
        m is None for Q8_0. Q4_0's implicit zero becomes ``m = -8 d`` (exact in fp16).
    """
    from ..weights.ggml_types import QUANT_SIZES as GGML_QUANT_SIZES, GGMLType as Q

    t = Q[ggml_type] if isinstance(ggml_type, str) else Q(ggml_type)
    if t not in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K):
        raise ValueError(f"{t.name} blocks have no int8/int4 form here; dequantize and use from_float")
    n, k = shape
    block, nbytes = GGML_QUANT_SIZES[t]
    if k % block:
        raise ValueError(f"rows of {k} are not whole {t.name} blocks")
    arr = np.asarray(raw)
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # e.g. a read-only memmap of the file
        arr = arr.copy()
    b = torch.from_numpy(arr).reshape(-1).view(torch.uint8)
    if b.numel() != n * k // block * nbytes:
        raise ValueError(f"{t.name} data of {b.numel()} bytes does not hold a {n}x{k} tensor")
    b = b.reshape(n * k // block, nbytes)
    d = b[:, 0:2].contiguous().view(torch.float16).reshape(n, k // block)
    if t == Q.Q8_0:
        q = b[:, 2:].contiguous().view(torch.int8).reshape(n, k)
        return 8, q, d, None
    if t == Q.Q4_K:
        return (4, *_q4_k_to_int(b, n, k))
    qs = b[:, 2:18] if t == Q.Q4_0 else b[:, 4:20]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=1).reshape(n, k)  # ggml: low nibbles are elements 0..15
    m = (d * -8) if t == Q.Q4_0 else b[:, 2:4].contiguous().view(torch.float16).reshape(n, k // block)
    return 4, q, d, m


def _q4_k_to_int(b: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of
    nibbles) -> int4 q, and per-32 d = d * sc, m = -dmin * mn as float16. ggml's layout: in each 64-weight chunk,
    the 32 low nibbles are sub-block 2i and the 32 high nibbles sub-block 2i + 1."""
    nb = b.shape[0]
    d = b[:, 0:2].contiguous().view(torch.float16).float()           # (nb, 1)
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    s = b[:, 4:16].to(torch.int32)                                     # (nb, 12)
    sc = torch.empty(nb, 8, dtype=torch.int32)
    mn = torch.empty(nb, 8, dtype=torch.int32)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = b[:, 16:144].reshape(nb, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, k)          # (nb, 4 chunks, 2 sub-blocks, 32)
    dd = (d * sc.float()).to(torch.float16).reshape(n, k // 32)
    mm = (-(dmin * mn.float())).to(torch.float16).reshape(n, k // 32)
    return q, dd, mm
