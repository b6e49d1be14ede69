"""Weight layouts of the kernels, built from (and turned back into) the plain format of ``formats.py``.

- prosa (``prosa/csrc/qlinear.cpp``): rows interleaved ``TILE`` = 16 at a time, int8 as (T, K/4, 16, 4) bytes,
  int4 as (T, K/8, 16, 4) bytes of two nibbles, scales and mins as (T, K/G, 16) float16.
- aten (``aten._convert_weight_to_int4pack_for_cpu``): whatever this torch build packs; ``_aten_int4_order``
  finds where each weight lands so that ``_aten_int4_unpack`` can undo the packing.
"""
from __future__ import annotations

from typing import Iterable

import torch

TILE = 16          # output rows per tile of the prosa layout
ATEN_ROWS = 256    # rows per chunk when undoing aten's int4 packing (a multiple of its row blocks, 32 or 64)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def _pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> prosa layout uint8 (T, K/4, 16, 4), stored as q + 128; uint8 codes (asymmetric) as they are."""
    n, k = q.shape
    t = -(-n // TILE)
    u = _pad_rows(q, t * TILE).view(torch.uint8)
    u = (u if q.dtype == torch.uint8 else u ^ 0x80).reshape(t, TILE, k // 4, 4)
    return u.permute(0, 2, 1, 3).contiguous()


def _unpack_int8(p: torch.Tensor, n: int, asym: bool = False) -> torch.Tensor:
    t, k4 = p.shape[:2]
    q = p if asym else (p ^ 0x80).view(torch.int8)
    return q.permute(0, 2, 1, 3).reshape(t * TILE, k4 * 4)[:n]


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 0..15 (N, K) -> prosa layout uint8 (T, K/8, 16, 4): byte j = q[k+j] | q[k+4+j] << 4."""
    n, k = q.shape
    t = -(-n // TILE)
    u = _pad_rows(q, t * TILE).reshape(t, TILE, k // 8, 2, 4)
    b = u[..., 0, :] | (u[..., 1, :] << 4)
    return b.permute(0, 2, 1, 3).contiguous()


def _unpack_int4(p: torch.Tensor, n: int) -> torch.Tensor:
    t, k8 = p.shape[:2]
    b = p.permute(0, 2, 1, 3)                                    # (T, 16, K/8, 4)
    q = torch.stack((b & 0x0F, b >> 4), dim=3)                   # (T, 16, K/8, 2, 4)
    return q.reshape(t * TILE, k8 * 8)[:n]


def _pack_scales(s: torch.Tensor) -> torch.Tensor:
    """(N, K/G) -> (T, K/G, 16) fp16."""
    n, ng = s.shape
    t = -(-n // TILE)
    return _pad_rows(s.to(torch.float16), t * TILE).reshape(t, TILE, ng).transpose(1, 2).contiguous()


def _unpack_scales(p: torch.Tensor, n: int) -> torch.Tensor:
    t, ng, _ = p.shape
    return p.transpose(1, 2).reshape(t * TILE, ng)[:n]


def symmetric_int4(d: torch.Tensor, m: torch.Tensor | None) -> bool:
    """Are int4 mins exactly ``-8 d`` (GGUF Q4_0's ``W = d (q - 8)``)? The prosa kernels then derive them from
    the scales instead of reading them (1/9 of the bytes of an int4 layer). Both float16, same shape."""
    return m is not None and torch.equal(m, d * -8)


def _pack_prosa_chunks(n: int, k: int, group: int, bits: int, asym: bool,
                       chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]
                       ) -> dict[str, torch.Tensor]:
    """The prosa layout of an (N, K) weight given as row chunks of the plain format, each packed straight into
    its slice of the result: the packing's temporaries are one chunk's, not the weight's (a 49152 x 576 output
    layer would otherwise hold its codes twice, 28 MB each, besides the result).

    Args:
        chunks: ``(first row, q, d, m)`` in row order, covering the N rows; every chunk but the last a whole
            number of ``TILE`` rows. q (rows, K) int8 / uint8, d and m (rows, K // group) float16 (m None when
            not ``asym``).
    Returns:
        the buffers of a prosa ``QuantizedLinear``: qweight, scales (and mins, unless every chunk's are ``-8 d``:
        int4 with mins is then symmetric, see ``symmetric_int4``).
    """
    t = -(-n // TILE)
    out = {"qweight": torch.empty(t, k // (4 if bits == 8 else 8), TILE, 4, dtype=torch.uint8),
           "scales": torch.empty(t, k // group, TILE, dtype=torch.float16)}
    if asym:
        out["mins"] = torch.empty_like(out["scales"])
    done, symmetric = 0, asym and bits == 4
    for r0, q, d, m in chunks:
        if r0 != done or (r0 % TILE):
            raise ValueError(f"row chunks must follow each other in whole tiles of {TILE}: got row {r0} after {done}")
        t0, t1 = r0 // TILE, -(-(r0 + q.shape[0]) // TILE)
        out["qweight"][t0:t1] = _pack_int8(q) if bits == 8 else _pack_int4(q)
        out["scales"][t0:t1] = _pack_scales(d)
        if asym:
            out["mins"][t0:t1] = _pack_scales(m)
            symmetric = symmetric and symmetric_int4(d, m)
        done = r0 + q.shape[0]
    if done != n:
        raise ValueError(f"row chunks cover {done} rows of {n}")
    if symmetric:
        del out["mins"]
    return out


def _aten_int4_order(n: int, k: int) -> torch.Tensor:
    """Where aten's int4 CPU packing puts each weight: nibble i of the packed tensor (low nibble of byte j is
    2j, high 2j+1) holds element ``order[i]`` of the flattened (N, K) input, (N * K,) int64. Found by packing the
    element index, 4 bits at a time, so it follows whatever layout this torch build uses. Not cached: for an
    output layer (49152 x 576) it is ~226 MB."""
    idx = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
        q = ((idx >> shift) & 0xF).to(torch.int32).reshape(n, k)
        nib = _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        order |= nib.to(torch.int64) << shift
    return order


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The nibbles of packed bytes in order, (2 * bytes,) uint8: low nibble of byte j is 2j, high 2j+1."""
    p = packed.reshape(-1)
    return torch.stack((p & 0x0F, p >> 4), -1).reshape(-1)


def _aten_int4_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Undo ``aten._convert_weight_to_int4pack_for_cpu``: its packed tensor -> the codes (N, K) uint8 0..15.

    aten packs blocks of rows (32 or 64) one after the other, each independently, so the permutation is derived
    on one chunk of ``ATEN_ROWS`` rows, applied to every whole chunk, and derived again for the rows left over:
    (ATEN_ROWS * K,) int64 at most instead of (N * K,). The result is checked by packing it again (the packing
    permutes nibbles, so equal bytes mean equal codes); on a build that packs otherwise the whole permutation is
    derived (slower, the same result). Nothing is kept."""
    nib = _nibbles(packed)                                       # (N * K,) in packed order
    q = torch.empty(n * k, dtype=torch.uint8)
    chunks, rest = divmod(n, ATEN_ROWS)
    whole = chunks * ATEN_ROWS * k
    if chunks:
        q[:whole].view(chunks, -1)[:, _aten_int4_order(ATEN_ROWS, k)] = nib[:whole].view(chunks, -1)
    if rest:
        q[whole:][_aten_int4_order(rest, k)] = nib[whole:]
    q = q.reshape(n, k)
    if not torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), packed):
        q = torch.empty(n * k, dtype=torch.uint8)
        q[_aten_int4_order(n, k)] = nib
        q = q.reshape(n, k)
    return q


def _aten_int4_ok(n: int, k: int, group_size: int) -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and group_size in (32, 64, 128, 256)
            and k % group_size == 0 and n % 16 == 0)
