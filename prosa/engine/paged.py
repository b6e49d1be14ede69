"""``PagedBatch``: the cache a model forward sees when the engine runs it (``prosa.models.cache.Cache``).

One forward runs T new tokens for each of B sequences; sequence b already holds ``starts[b]`` tokens in the
``BlockPool`` blocks its table names, so its new tokens sit at positions ``starts[b] .. starts[b] + T - 1``. Rows
have their own lengths: there is no padding, and nothing about a row depends on the others.

Attention:
- one new token per row (decode) on a CPU with prosa's kernels and float32 keys: ``paged_attention`` in C++ reads
  each row's keys straight from its blocks, over exactly its own length (the same arithmetic alone or batched);
- otherwise (prompts, other dtypes, CUDA): each row's keys are gathered from its blocks into a (B, H_kv, S, D)
  tensor and PyTorch's attention runs with a causal (and window) mask; rows shorter than S are masked.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..models.base import attention
from .blocks import BlockPool


class PagedBatch:
    """The ``Cache`` of one forward over rows of the paged pool.

    Args:
        pool: the engine's ``BlockPool``.
        tables: each row's block table (covering every position the forward writes).
        starts: each row's tokens already in the cache.
        kernels: prosa's C++ module (for ``paged_attention``), or None.
    """

    def __init__(self, pool: BlockPool, tables: Sequence[Sequence[int]], starts: Sequence[int], kernels=None):
        self.pool, self.kernels = pool, kernels
        width = max(len(t) for t in tables)
        # (B, blocks) int32; short tables are padded with their own first block (never read past a row's end).
        rows = [list(t) + [t[0]] * (width - len(t)) for t in tables]
        self.table = torch.tensor(rows, dtype=torch.int32)
        self.starts = torch.tensor(list(starts), dtype=torch.long)
        self._starts = list(starts)
        self.positions: torch.Tensor | None = None   # (B, T) once begun
        self._slots: torch.Tensor | None = None      # (B * T,) slot of every new token
        self._gather: tuple[torch.Tensor, torch.Tensor, int | None] | None = None   # slots, mask, window

    @property
    def batch_size(self) -> int:
        return len(self._starts)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions (B, T) of the new tokens: each row continues from its own length."""
        b, t = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"PagedBatch holds {self.batch_size} sequences, got input for {b}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("PagedBatch rows have their own lengths: padding is not supported")
        self.positions = self.starts[:, None] + torch.arange(t)
        self._slots = None            # made by the first attend (the fused step writes the cache itself)
        self._gather = None
        device = self.pool.device
        return self.positions.to(device) if device.type != "cpu" else self.positions

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Pool slots of ``positions`` (B, S) long: ``table[p // bs] * bs + p % bs`` row by row."""
        bs = self.pool.block_size
        return self.table.long().gather(1, positions // bs) * bs + positions % bs

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None, upcast: bool = False) -> torch.Tensor:
        """``Cache.attend``: write k/v (B, H_kv, T, D) into the rows' blocks, attend q (B, H, T, D) over them."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]      # (slots, H_kv, D)
        b, h_kv, t, d = k.shape
        if self._slots is None:
            self._slots = self.slots(self.positions).reshape(-1).to(keys.device)
        slots = self._slots
        keys.index_copy_(0, slots, k.transpose(1, 2).reshape(b * t, h_kv, d).to(keys.dtype))
        values.index_copy_(0, slots, v.transpose(1, 2).reshape(b * t, h_kv, d).to(values.dtype))
        scale = 1 / math.sqrt(d) if scale is None else scale
        ext = self.kernels
        if (t == 1 and ext is not None and keys.device.type == "cpu" and keys.dtype == torch.float32
                and (q.dtype == torch.float32 or upcast)):
            out = ext.paged_attention(q[:, :, 0].float(), keys, values, self.table, self.positions[:, 0].contiguous(),
                                      self.pool.block_size, window or 0, scale)
            return out[:, :, None].to(q.dtype)                               # (B, H, 1, D)
        key_slots, mask = self._gathered(window)
        dev = keys.device
        kk = keys[key_slots.to(dev)].permute(0, 2, 1, 3)                    # (B, H_kv, S, D)
        vv = values[key_slots.to(dev)].permute(0, 2, 1, 3)
        mask = mask.to(dev)
        if upcast:
            return attention(q.float(), kk.float(), vv.float(), mask, scale).to(q.dtype)
        return attention(q, kk.to(q.dtype), vv.to(q.dtype), mask, scale)

    def _gathered(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots (B, S) of every key position 0..S-1, mask (B, 1, T, S)) for the gathering path."""
        if self._gather is None or self._gather[2] != window:
            t = self.positions.shape[1]
            longest = max(self._starts) + t
            keys = torch.arange(longest)[None, :]                            # (1, S)
            ends = self.starts[:, None] + t                                  # (B, 1): keys held after this forward
            slots = self.slots(torch.minimum(keys.expand(len(self._starts), -1), ends - 1))
            q = self.positions[:, :, None]                                   # (B, T, 1)
            allowed = keys[:, None, :] <= q                                  # causal; also hides other rows' tails
            if window:
                allowed = allowed & (q - keys[:, None, :] < window)
            self._gather = (slots, allowed[:, None], window)
        return self._gather[0], self._gather[1]
