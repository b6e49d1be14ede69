"""GGUF tensor data -> torch: dequantization of the block types, reading one tensor out of the mapped file, and
undoing llama.cpp's Q/K row order.

Bit-for-bit ``gguf.quants.dequantize``; the block types small models ship with are vectorised in torch, the
K-quants use gguf-py's numpy reference.
"""
from __future__ import annotations

import math
import mmap
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from prosa.errors import UnsupportedModelError

from .ggml_types import QUANT_SIZES as GGML_QUANT_SIZES, GGMLType as Q
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
    q = torch.empty((qs.shape[0], 32), dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=q[:, :16])
    torch.bitwise_right_shift(qs, 4, out=q[:, 16:])
    return q


def _nibbles5(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q5 values: 4 low bits from ``qs``, the 5th from bit j of the little-endian uint32 ``qh`` (element j)."""
    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1
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
        from gguf import GGMLQuantizationType, quants  # the numpy reference; importing gguf costs ~0.1 s

        return torch.from_numpy(quants.dequantize(rows, GGMLQuantizationType(int(ggml_type)))).reshape(shape)
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


CHUNK = 1 << 18     # weights per step of the chunked readers: 1 MB of float32, so every temporary stays in cache


def _release_span(mm: mmap.mmap, start: int, nbytes: int) -> None:
    """Unmap the whole pages inside ``[start, start + nbytes)`` of the file (see ``_release``)."""
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hasattr(mm, "madvise") and hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def row_chunks(mm: mmap.mmap, info: _TensorInfo, order: torch.Tensor | None = None, multiple: int = 1,
               ) -> Iterator[tuple[int, np.ndarray]]:
    """The raw bytes of a tensor's rows (its first dimension), ``CHUNK`` weights' worth at a time (a whole
    number of ``multiple`` rows): ``(first row, bytes (rows, row bytes) uint8)``, read-only views of the map,
    or copies gathered in the row ``order`` given (output row r is file row ``order[r]``). The file's pages are
    unmapped as they are passed, so the map never holds more than a chunk of the tensor in this process's RSS
    (the page cache keeps them).

    Raises:
        ValueError: rows that are not whole blocks of the tensor's type (1-D tensors of a quantized type).
    """
    n = info.shape[0] if info.shape else 1
    per_row = math.prod(info.shape[1:]) if len(info.shape) > 1 else math.prod(info.shape)
    if info.ggml_type not in _FLOAT and per_row % GGML_QUANT_SIZES[Q(info.ggml_type)][0]:
        raise ValueError(f"rows of {per_row} are not whole {Q(info.ggml_type).name} blocks")
    row_bytes = info.nbytes // n
    rows = np.frombuffer(mm, np.uint8, info.nbytes, info.start).reshape(n, row_bytes)
    step = max(1, CHUNK // max(per_row, 1) // multiple) * multiple
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        if order is None:
            yield r0, rows[r0:r1]
            _release_span(mm, info.start + r0 * row_bytes, (r1 - r0) * row_bytes)
        else:
            yield r0, rows[order[r0:r1].numpy()]
    _release(mm, info)


def read_tensor(mm: mmap.mmap, info: _TensorInfo, dtype: torch.dtype, order: torch.Tensor | None = None,
                ) -> torch.Tensor:
    """One tensor in ``dtype``, dequantized (in float32, then cast: bit for bit ``_read(...).to(dtype)``) and
    written into the result chunk by chunk: one pass over the file's bytes, and no temporary bigger than a chunk
    (a whole-tensor dequantization held the raw bytes, the float32 product and an int-to-float copy at once:
    +190 MB for the 49152 x 576 Q8_0 embedding). ``order``: output row r is file row ``order[r]``."""
    shape = info.shape
    if len(shape) < 2:          # norms and biases: small
        w = _read(mm, info)
        return (w if order is None else w[order]).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    for r0, raw in row_chunks(mm, info, order):
        rows = raw.shape[0]
        out[r0:r0 + rows] = dequantize(_tensor(raw), info.ggml_type, (rows, *shape[1:]))
    return out


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order.

    The converter does ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``, interleaving the two
    rotary halves of each head (ggml's rope rotates adjacent pairs, HF's rotates halves).
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor(raw: np.ndarray) -> torch.Tensor:
    """A chunk of bytes as a torch tensor (a view of the map is read-only: copied, one chunk)."""
    return torch.from_numpy(raw if raw.flags.writeable else raw.copy())
