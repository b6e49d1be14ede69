"""Weight layouts of the kernels, built from (and turned back into) the plain format of ``formats.py``.

- prosa (``prosa/csrc/qlinear.cpp``): rows interleaved ``TILE`` = 16 at a time, int8 as (T, K/4, 16, 4) bytes,
  int4 as (T, K/8, 16, 4) bytes of two nibbles, scales and mins as (T, K/G, 16) float16.
- aten (``aten._convert_weight_to_int4pack_for_cpu``): whatever this torch build packs; ``_aten_int4_order``
  finds where each weight lands so that the packing can be undone.
"""
from __future__ import annotations

import functools

import torch

TILE = 16          # output rows per tile of the prosa layout


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


@functools.lru_cache(maxsize=64)
def _aten_int4_order(n: int, k: int) -> torch.Tensor:
    """Where aten's int4 CPU packing puts each weight: nibble i of the packed tensor (low nibble of byte j is
    2j, high 2j+1) holds element ``order[i]`` of the flattened (N, K) input. Found by packing the element index,
    4 bits at a time, so it follows whatever layout this torch build uses."""
    idx = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
        q = ((idx >> shift) & 0xF).to(torch.int32).reshape(n, k)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(-1)
        nib = torch.stack((p & 0x0F, p >> 4), -1).reshape(-1).to(torch.int64)
        order |= nib << shift
    return order


def _aten_int4_ok(n: int, k: int, group_size: int) -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and group_size in (32, 64, 128, 256)
            and k % group_size == 0 and n % 16 == 0)
