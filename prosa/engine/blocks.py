"""The engine's KV memory: fixed-size blocks of token slots, shared by reference count and remembered by content.

Every layer's keys (and values) live in one tensor ``(slots, H_kv, D)``; a block is ``block_size`` consecutive
slots, the same block ids in every layer. A sequence holds a list of block ids (its block table): position ``p``
is slot ``table[p // bs] * bs + p % bs``. Sequences never share a block they write to: shared blocks are full
(a prompt prefix found in the prefix cache, or the prompt of ``n`` samples), and a partly filled block is copied
when a sequence forks.

Prefix cache: when a block fills, it is registered under ``(hash of the previous block's key, its tokens)``.
A block whose last holder lets it go keeps its keys/values and its registration and waits in an LRU list;
a new sequence whose prompt starts with the same tokens takes it back instead of recomputing it.

Memory follows the referenced blocks (what running sequences hold), not the prefix cache:
- a new block takes a free slot of the tensors, else evicts the least recently used cached block while the
  referenced blocks fill less than half of the tensors; only then do they grow (by doubling, up to
  ``num_blocks``), so cached prefixes live in the room running sequences leave;
- ``settle()`` (the engine calls it between steps) shrinks the tensors when the peak of referenced blocks since the
  last call fits a quarter of them (a long sequence has ended and only short ones followed): the referenced blocks
  stay where they are, the most recently used cached blocks move into the free slots below the new size, the
  others are forgotten.
A chat's conversation is referenced by every turn, so it is never what shrinks away.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Sequence

import torch

ROOT = 0            # the "previous block hash" of a sequence's first block
MIN_BLOCKS = 16     # the tensors' smallest size in blocks
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
            beyond it are freed); None: no limit but the tensors' size.
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
        self._peak = 0                           # most blocks referenced at once since the last settle()
        self._changed = False                    # references dropped or prefixes forgotten since settle()

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes the keys and values tensors hold now (``capacity`` blocks)."""
        return self.capacity * self.block_size * self.bytes_per_token

    @property
    def cached(self) -> int:
        """Unreferenced blocks kept for the prefix cache."""
        return len(self._lru)

    # -- references ----------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block for one sequence's exclusive use (reference count 1): a free slot of the tensors, else the
        least recently used cached block while the referenced blocks fill less than half of the tensors, else
        a new slot (the tensors grow).

        Raises:
            RuntimeError: every block is referenced (the engine's reservations prevent this).
        """
        if self._free and (self._free[0] < self.capacity or not self._lru or 2 * (self.used + 1) > self.capacity):
            block = heapq.heappop(self._free)
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            del self._table[self._key.pop(block)]
        else:
            raise RuntimeError("the KV cache is full")
        self._grow(block + 1)
        self._refs[block] = 1
        self.used += 1
        self._peak = max(self._peak, self.used)
        return block

    def share(self, block: int) -> None:
        """Add a reference to ``block`` (a prefix hit, or the prompt of another sample)."""
        if self._refs[block] == 0:
            self._lru.pop(block, None)
            self.used += 1
            self._peak = max(self._peak, self.used)
        self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. Pass a table last block first: the LRU then evicts a released
        prefix from its end, keeping its start (shared by more prompts) longest."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self.used -= 1
                self._changed = True
                if block in self._key:
                    self._lru[block] = None
                else:
                    heapq.heappush(self._free, block)
        while len(self._lru) > self.cache_blocks:      # over the prefix cache's budget: forget the oldest
            self._drop(self._lru.popitem(last=False)[0])

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
        self._changed = True

    def forget(self, tokens: Sequence[int], keep: int = 0) -> int:
        """Forget the cached blocks of the sequence ``tokens`` after its first ``keep`` tokens, and every block
        cached after them (replies, retries): e.g. a conversation that was reset, keeping its system prompt.
        Blocks a running sequence holds stay registered.

        Args:
            tokens: the sequence's token ids from its start (e.g. the last prompt of a conversation).
            keep: leading tokens whose whole blocks stay cached.
        Returns:
            the number of blocks forgotten.
        """
        bs, parent, starts = self.block_size, ROOT, []
        for i in range(len(tokens) // bs):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            if key not in self._table:
                break
            parent = hash(key)
            if (i + 1) * bs > keep:
                starts.append(self._table[key])
        if not starts:
            return 0
        children: dict[int, list[int]] = {}             # a block's hash -> the blocks registered after it
        for block, key in self._key.items():
            children.setdefault(key[0], []).append(block)
        doomed, todo = set(starts), list(starts)
        while todo:
            for child in children.get(hash(self._key[todo.pop()]), ()):
                if child not in doomed:
                    doomed.add(child)
                    todo.append(child)
        dropped = 0
        for block in doomed:
            if self._refs[block] == 0:
                del self._lru[block]
                self._drop(block)
                dropped += 1
        self._peak = self.used                      # what the forgotten blocks' sequences needed is no demand now
        self._changed = True
        return dropped

    def _drop(self, block: int) -> None:
        """Unregister unreferenced ``block`` (already out of the LRU) and free it."""
        del self._table[self._key.pop(block)]
        heapq.heappush(self._free, block)

    # -- storage -----------------------------------------------------------------------------------------------------
    def settle(self) -> bool:
        """Shrink the tensors after demand fell: if the most blocks referenced at once since the last call fit a
        quarter of the tensors, keep room for twice that (at least ``MIN_BLOCKS``, and every referenced block,
        which never moves). The most recently used cached blocks move into the free room; the rest are
        forgotten. Does nothing unless references were dropped or prefixes forgotten since the last call.

        Returns:
            whether the tensors were reallocated (the caller may then give the freed memory back: ``heap.trim``).
        """
        if not self._changed:
            return False
        self._changed = False
        demand, self._peak = max(self._peak, self.used), self.used
        target = max(MIN_BLOCKS, 1 << max(0, 2 * demand - 1).bit_length())     # a power of two >= 2 * demand
        if 2 * target > self.capacity:
            return False
        top = next((b + 1 for b in range(self.capacity - 1, -1, -1) if self._refs[b]), 0)
        new = min(self.num_blocks, max(target, top))
        if 2 * new > self.capacity:
            return False
        self._resize(new)
        return True

    def _resize(self, new: int) -> None:
        """Reallocate the tensors to ``new`` blocks (``new`` > every referenced block): cached blocks, most
        recently used first, keep what free room there is (those above ``new`` are copied down); the rest are
        forgotten."""
        room = new - self.used                          # slots below new that no referenced block holds
        keep = list(reversed(self._lru))[:room]         # newest first
        for block in list(self._lru)[:len(self._lru) - len(keep)]:
            del self._lru[block]
            self._drop(block)
        taken = {b for b in keep if b < new}
        holes = (b for b in range(new) if not self._refs[b] and b not in taken)
        moves = {b: next(holes) for b in keep if b >= new}      # old id -> new id (below new)
        bs, shape = self.block_size, (new * self.block_size, self.kv_heads, self.head_dim)
        for bufs in (self.keys, self.values):
            for layer, old in enumerate(bufs):
                buf = torch.empty(shape, dtype=self.dtype, device=self.device)     # (new * bs, H_kv, D)
                buf[:min(new, self.capacity) * bs] = old[:new * bs]
                for src, dst in moves.items():
                    buf[dst * bs:(dst + 1) * bs] = old[src * bs:(src + 1) * bs]
                bufs[layer] = buf
        lru = [moves.get(b, b) for b in self._lru]      # the same order, new ids
        for src, dst in moves.items():
            key = self._key.pop(src)
            self._key[dst], self._table[key] = key, dst
        self._lru = OrderedDict.fromkeys(lru)
        cached = set(lru)
        self._free = [b for b in range(self.num_blocks) if not self._refs[b] and b not in cached]   # sorted: a heap
        self.capacity = new

    def _grow(self, blocks: int) -> None:
        if blocks <= self.capacity:
            return
        cap = min(self.num_blocks, max(blocks, 2 * self.capacity, MIN_BLOCKS))
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
