"""The engine's KV memory: fixed-size blocks of token slots, shared by reference count and remembered by content.

Every layer's keys (and values) live in one tensor ``(slots, H_kv, D)``; a block is ``block_size`` consecutive
slots, the same block ids in every layer. A sequence holds a list of block ids (its block table): position ``p``
is slot ``table[p // bs] * bs + p % bs``. Sequences never share a block they write to: shared blocks are full
(a prompt prefix found in the prefix cache, or the prompt of ``n`` samples), and a partly filled block is copied
when a sequence forks.

Prefix cache: when a block fills, it is registered under ``(hash of the previous block's key, its tokens)``.
A block whose last holder lets it go keeps its keys/values and its registration and waits in an LRU list;
a new sequence whose prompt starts with the same tokens takes it back instead of recomputing it; a block is
only really reused for something else (evicted, least recently used first) when no free block is left. The
budget is the pool itself: cached prefixes use memory no running sequence needs.

The pool's tensors grow by doubling, up to ``num_blocks``, so a light workload does not pay for the whole budget.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Sequence

import torch

ROOT = 0            # the "previous block hash" of a sequence's first block
Key = tuple[int, tuple[int, ...]]


class BlockPool:
    """KV storage for ``num_layers`` layers in ``num_blocks`` blocks of ``block_size`` tokens.

    Args:
        num_layers, kv_heads, head_dim: what a token stores per layer.
        dtype, device: of the keys and values (the model's activations).
        block_size: tokens per block.
        num_blocks: the budget; the tensors grow up to this many blocks.
        prefix_cache: remember full blocks by content (see the module docstring).
        cache_blocks: at most this many unreferenced blocks are kept for the prefix cache (the least recently used
            beyond it are freed), so that memory settles at what running sequences need plus this; None: no limit
            but the pool.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 block_size: int, num_blocks: int, prefix_cache: bool = True, cache_blocks: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.block_size, self.num_blocks, self.prefix_cache = block_size, num_blocks, prefix_cache
        self.cache_blocks = num_blocks if cache_blocks is None else cache_blocks
        self.keys: list[torch.Tensor] = []       # per layer (capacity * block_size, H_kv, D)
        self.values: list[torch.Tensor] = []
        self.capacity = 0                        # blocks the tensors hold now
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks))     # a heap: the lowest free id first keeps the tensors small
        self._lru: OrderedDict[int, None] = OrderedDict()   # unreferenced blocks still registered, oldest first
        self._table: dict[Key, int] = {}         # registered content -> block
        self._key: dict[int, Key] = {}           # block -> its registered content
        self.used = 0                            # blocks with a reference
        self.reserved = 0                        # blocks promised to admitted sequences (see Engine)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def cached(self) -> int:
        """Unreferenced blocks kept for the prefix cache."""
        return len(self._lru)

    # -- references ----------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block for one sequence's exclusive use (reference count 1); evicts the least recently used cached
        block when no block is free.

        Raises:
            RuntimeError: every block is referenced (the engine's reservations prevent this).
        """
        if self._free:
            block = heapq.heappop(self._free)
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            del self._table[self._key.pop(block)]
        else:
            raise RuntimeError("the KV cache is full")
        self._grow(block + 1)
        self._refs[block] = 1
        self.used += 1
        return block

    def share(self, block: int) -> None:
        """Add a reference to ``block`` (a prefix hit, or the prompt of another sample)."""
        if self._refs[block] == 0:
            self._lru.pop(block, None)
            self.used += 1
        self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. Pass a table last block first: the LRU then evicts a released
        prefix from its end, keeping its start (shared by more prompts) longest."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self.used -= 1
                if block in self._key:
                    self._lru[block] = None
                else:
                    heapq.heappush(self._free, block)
        while len(self._lru) > self.cache_blocks:      # over the prefix cache's budget: forget the oldest
            old, _ = self._lru.popitem(last=False)
            del self._table[self._key.pop(old)]
            heapq.heappush(self._free, old)

    def copy(self, src: int, dst: int) -> None:
        """Copy block ``src``'s keys and values into ``dst`` (every layer)."""
        bs = self.block_size
        for buf in (*self.keys, *self.values):
            buf[dst * bs:(dst + 1) * bs] = buf[src * bs:(src + 1) * bs]

    # -- prefix cache ----------------------------------------------------------------------------------------------
    def lookup(self, parent: int, tokens: Sequence[int]) -> tuple[int, int] | None:
        """The cached block holding ``tokens`` after the block hashed ``parent``, referenced for the caller, and
        its hash; None when not cached."""
        if not self.prefix_cache:
            return None
        key = (parent, tuple(tokens))
        block = self._table.get(key)
        if block is None:
            return None
        self.share(block)
        return block, hash(key)

    def register(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Remember that full ``block`` holds ``tokens`` after the block hashed ``parent``; return its hash (the
        ``parent`` of the next block)."""
        key = (parent, tuple(tokens))
        if self.prefix_cache and key not in self._table and block not in self._key:
            self._table[key] = block
            self._key[block] = key
        return hash(key)

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (e.g. after the model's weights changed)."""
        for block in self._lru:
            heapq.heappush(self._free, block)
        self._lru.clear()
        self._table.clear()
        self._key.clear()

    # -- storage -----------------------------------------------------------------------------------------------------
    def _grow(self, blocks: int) -> None:
        if blocks <= self.capacity:
            return
        cap = min(self.num_blocks, max(blocks, 2 * self.capacity, 16))
        shape = (cap * self.block_size, self.kv_heads, self.head_dim)
        used = self.capacity * self.block_size
        for bufs in (self.keys, self.values):
            for layer in range(self.num_layers):
                new = torch.empty(shape, dtype=self.dtype, device=self.device)
                if bufs and used:
                    new[:used] = bufs[layer][:used]
                if len(bufs) == self.num_layers:
                    bufs[layer] = new
                else:
                    bufs.append(new)
        self.capacity = cap
