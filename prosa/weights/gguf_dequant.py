"""GGUF tensor data -> torch: dequantization of the block types, reading one tensor out of the mapped file, and
undoing llama.cpp's Q/K row order.

Bit-for-bit ``gguf.quants.dequantize``; the block types small models ship with are vectorised in torch, the
K-quants use gguf-py's numpy reference.
"""
from __future__ import annotations

import mmap
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as _gguf_quants

from prosa.errors import UnsupportedModelError

from .gguf_format import _TensorInfo

# Tensor types: the hot ones are dequantized in torch below, the K-quants by gguf-py's numpy reference.
_FLOAT = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_TORCH_QUANTS = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
_NUMPY_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The ggml_half (fp16) at byte ``start`` of every block, as a float32 column."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 4-bit values; ggml puts low nibbles at elements 0..15 and high ones at 16..31."""
    q = torch.empty((qs.shape[0], 32), dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[:, :16])
    torch.bitwise_right_shift(qs, 4, out=q[:, 16:])
    return q


def _nibbles5(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q5 values: 4 low bits from ``qs``, the 5th from bit j of the little-endian uint32 ``qh`` (element j)."""
    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return _nibbles(qs).bitwise_or_((bits << 4).reshape(qh.shape[0], 32))


def _unsupported_type(ggml_type: int) -> UnsupportedModelError:
    name = Q(ggml_type).name
    return UnsupportedModelError(f"GGUF tensor type {name} is not supported; use a file quantized as F16, BF16, "
                                 "Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q5_0/1 or Q4_0/1.")


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8) of one tensor -> a tensor of ``shape``: float32 for quantized types, else its own dtype.

    Bit-for-bit ``gguf.quants.dequantize``: each scale * quant product is exact in float32 (11 + 8 bits at most),
    so ``m + d*q`` rounds once however it is computed. The block types small models ship with are vectorised in
    torch (about twice as fast as gguf-py's numpy); the K-quants use gguf-py's code.
    """
    if ggml_type in _FLOAT:
        return raw.view(_FLOAT[Q(ggml_type)]).reshape(shape)
    if ggml_type not in _TORCH_QUANTS | _NUMPY_QUANTS:
        raise _unsupported_type(ggml_type)
    ggml_type = Q(ggml_type)
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in _NUMPY_QUANTS:
        rows = raw.numpy().reshape(-1, shape[-1] // block * block_bytes)
        return torch.from_numpy(_gguf_quants.dequantize(rows, ggml_type)).reshape(shape)
    b = raw.reshape(-1, block_bytes)
    d = _halves(b, 0)
    if ggml_type == Q.Q8_0:  # d, 32 x int8
        w = d * b[:, 2:].view(torch.int8)
    elif ggml_type == Q.Q4_0:  # d, 32 x (4 bits - 8)
        w = torch.addcmul(d * -8, d, _nibbles(b[:, 2:]))
    elif ggml_type == Q.Q4_1:  # d, m, 32 x 4 bits
        w = torch.addcmul(_halves(b, 2), d, _nibbles(b[:, 4:]))
    elif ggml_type == Q.Q5_0:  # d, qh, 32 x (5 bits - 16)
        w = torch.addcmul(d * -16, d, _nibbles5(b[:, 6:], b[:, 2:6]))
    else:  # Q5_1: d, m, qh, 32 x 5 bits
        w = torch.addcmul(_halves(b, 2), d, _nibbles5(b[:, 8:], b[:, 4:8]))
    return w.reshape(shape)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a tensor's dequantization on one thread. It is a few cheap elementwise passes, and with intra-op threads
    each pass is a parallel region whose barrier waits for every core: on a busy 2-core machine the 135M model took
    10 s (and 6x the CPU time) instead of 1.5 s. Restored before the tensor is handed over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _release(mm: mmap.mmap, info: _TensorInfo) -> None:
    """Unmap the file pages of a tensor just copied out (they stay in the page cache; RSS drops by their size)."""
    lo = info.start // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(-(-(info.start + info.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
    if hasattr(mm, "madvise") and hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _read(mm: mmap.mmap, info: _TensorInfo) -> torch.Tensor:
    """One tensor, dequantized. A single copy out of the page cache, so the result owns its memory."""
    raw = torch.from_numpy(np.frombuffer(mm, np.uint8, info.nbytes, info.start).copy())
    _release(mm, info)
    return dequantize(raw, info.ggml_type, info.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order.

    The converter does ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``, interleaving the two
    rotary halves of each head (ggml's rope rotates adjacent pairs, HF's rotates halves).
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
