"""The cache protocol every model forward talks to, and ``KVCache``, the plain contiguous cache.

A model calls two methods of whatever cache it is given (``Cache``): ``begin`` once per forward (reserve room
for the new tokens, get their positions) and ``attend`` once per layer (store the layer's new keys/values and
attend over everything the sequence holds). Two caches implement it:

- ``KVCache`` (here): per-layer buffers (B, H_kv, capacity, D) for a batch that shares one slot index; prompts of
  different lengths are left-padded (``attention_mask``) and a valid-slot mask hides the pads. For direct model
  calls (perplexity, tests, ``model(ids)``).
- ``prosa.engine.paged.PagedBatch``: a view of the engine's paged cache for the sequences of one forward, each
  with its own length and block table; no padding.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .base import attention


@runtime_checkable
class Cache(Protocol):
    """What a model's forward needs from a cache."""

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve room for ``input_ids`` (B, T); return their positions (B, T) long."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None, upcast: bool = False) -> torch.Tensor:
        """Store ``k``, ``v`` (B, H_kv, T, D) of ``layer`` and return attention of ``q`` (B, H, T, D) over every
        key the sequence may see (causal; the last ``window`` keys when set), (B, H, T, D) in q's dtype.
        ``scale`` None means 1/sqrt(D); ``upcast`` computes in float32 (GPT-Neo)."""
        ...



def checked(cache: object) -> Cache:
    """``cache`` if it implements ``Cache``; else a TypeError naming what it lacks (e.g. the transformers
    fallback's ``TransformersCache``, which holds transformers' own cache and cannot attend for a prosa model).

    Raises:
        TypeError: ``cache`` has no ``begin``/``attend``.
    """
    if not isinstance(cache, Cache):
        lacks = [m for m in ("begin", "attend") if not callable(getattr(cache, m, None))]
        raise TypeError(f"{type(cache).__name__} is not a prosa Cache (it lacks {', '.join(lacks)}): give a prosa "
                        "model the cache its make_cache() returns, or None")
    return cache

class KVCache:
    """K/V cache for ``num_layers`` layers and ``batch_size`` sequences.

    Args:
        num_layers: layers of the model.
        batch_size: sequences decoded together.
        step: slots added each time the buffers grow.
    """

    def __init__(self, num_layers: int, batch_size: int, step: int = 256):
        self.num_layers, self.batch_size, self.step = num_layers, batch_size, step
        self.keys: list[torch.Tensor | None] = [None] * num_layers    # each (B, H_kv, capacity, D)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.offset = 0            # slots used, the same for every sequence (padding included)
        self.valid: torch.Tensor | None = None    # (B, capacity) bool: slot holds a real token
        self.lengths: torch.Tensor | None = None  # (B,) real tokens so far = position of the next token
        self._start = 0            # first slot written by the forward in progress
        self._masks: dict = {}
        self._padded = False       # some slot so far is padding

    # -- called by the model ---------------------------------------------------------------------------
    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve slots for the new tokens and return their positions.

        Args:
            input_ids: (B, T) new tokens.
            attention_mask: (B, T), 1 for real tokens and 0 for padding; None means all real.
        Returns:
            positions (B, T) long: each sequence's count of real tokens before the token (pads get 0).
        """
        b, t = input_ids.shape
        device = input_ids.device
        if self.valid is None:
            self.valid = torch.zeros(b, 0, dtype=torch.bool, device=device)
            self.lengths = torch.zeros(b, dtype=torch.long, device=device)
        real = (torch.ones(b, t, dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.to(device=device, dtype=torch.bool))
        self._start = self.offset
        self.offset += t
        if self.offset > self.valid.shape[1]:
            grow = -(-(self.offset - self.valid.shape[1]) // self.step) * self.step
            self.valid = torch.cat([self.valid, self.valid.new_zeros(b, grow)], dim=1)
        self.valid[:, self._start:self.offset] = real
        positions = (self.lengths[:, None] + real.cumsum(1) - 1).clamp_min(0)
        self.lengths = self.lengths + real.sum(1)
        self._padded = self._padded or attention_mask is not None and not bool(real.all())
        self._masks = {}
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer`` and return all of them so far.

        Args:
            k, v: (B, H_kv, T, D) for the tokens of the current forward.
        Returns:
            keys, values: (B, H_kv, offset, D) views of the buffers.
        """
        buf_k, buf_v = self.buffers(layer, k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)
        buf_k[:, :, self._start:self.offset] = k
        buf_v[:, :, self._start:self.offset] = v
        return buf_k[:, :, :self.offset], buf_v[:, :, :self.offset]

    def buffers(self, layer: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V buffers of ``layer``, (B, H_kv, capacity, D) contiguous, grown to hold the slots
        reserved by ``begin`` (the fused decode step writes into them directly)."""
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or self.offset > buf_k.shape[2]:
            cap = self.valid.shape[1]
            new_k = torch.empty(batch, kv_heads, cap, head_dim, dtype=dtype, device=device)
            new_v = torch.empty_like(new_k)
            if buf_k is not None:
                new_k[:, :, :self._start] = buf_k[:, :, :self._start]
                new_v[:, :, :self._start] = buf_v[:, :, :self._start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        return buf_k, buf_v

    def mask(self, window: int | None = None) -> torch.Tensor | None:
        """Attention mask for the current forward, (B, 1, T, offset) bool, or None when every key is allowed.

        Query ``i`` (slot ``start + i``) may see slot ``j`` when ``j`` holds a real token, ``j <= start + i``
        and, with a sliding ``window``, ``start + i - j < window``. A padding query also sees itself, so that
        no row is empty (an empty row would make softmax NaN).
        """
        if window is not None and window >= self.offset:
            window = None
        if window in self._masks:
            return self._masks[window]
        t = self.offset - self._start
        if t == 1 and window is None and not self._padded:
            mask = None
        else:
            device = self.valid.device
            q = torch.arange(self._start, self.offset, device=device)[:, None]  # (T, 1)
            j = torch.arange(self.offset, device=device)[None, :]                # (1, S)
            allowed = j <= q
            if window is not None:
                allowed = allowed & (q - j < window)
            mask = (allowed[None] & self.valid[:, None, :self.offset]) | (j == q)[None]
            mask = mask[:, None]   # (B, 1, T, S)
        self._masks[window] = mask
        return mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None, upcast: bool = False) -> torch.Tensor:
        """``Cache.attend``: store k/v in the buffers, then attention with the padding/causal/window mask."""
        keys, values = self.update(layer, k, v)
        mask = self.mask(window)
        if upcast:
            return attention(q.float(), keys.float(), values.float(), mask, scale).to(q.dtype)
        return attention(q, keys, values, mask, scale)

    # -- batch surgery -------------------------------------------------------
    def select(self, index: torch.Tensor) -> None:
        """Keep, reorder or duplicate sequences: row ``i`` becomes old row ``index[i]``.

        Gives ``n`` samples of one prompt that prompt's cache, or drops rows.
        """
        index = index.to(self.valid.device)

        def pick(buf: torch.Tensor | None) -> torch.Tensor | None:
            # Copy only the used slots; the spare capacity stays unwritten.
            if buf is None:
                return None
            out = buf.new_empty(len(index), *buf.shape[1:])
            out[:, :, :self.offset] = buf[index, :, :self.offset]
            return out

        self.keys = [pick(k) for k in self.keys]
        self.values = [pick(v) for v in self.values]
        self.valid = self.valid.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.batch_size = len(index)
        self._masks = {}

    def truncate(self, offset: int) -> None:
        """Forget every slot from ``offset`` on (a conversation rewound to a shared prefix)."""
        if offset < self.offset:
            self.valid[:, offset:] = False
            self.lengths = self.valid[:, :offset].sum(1)
            self.offset = offset
            self._masks = {}
