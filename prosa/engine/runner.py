"""How the engine runs tokens through the model: prompt chunks of one sequence, and one decode step for many.

- ``PagedRunner`` (prosa's own models, which tell their ``kv_shape``): every sequence's keys/values live in the
  shared ``BlockPool``; prompts reuse cached prefix blocks; samples of one prompt share its blocks; the decode
  step runs the whole batch at once (the fused C++ step for the Llama family, see ``prosa.decode``).
- ``SoloRunner`` (any other model with ``make_cache``/``forward``, e.g. the transformers fallback): each
  sequence has its own cache from ``model.make_cache(1)`` and every forward is a batch of one. Correct
  everywhere, fast nowhere; no prefix reuse.
"""
from __future__ import annotations

import copy
from typing import Sequence as Seq

import torch
from torch import nn

from .blocks import ROOT, BlockPool
from .paged import PagedBatch
from .sequence import Sequence


class PagedRunner:
    """Runs a native model on the paged cache.

    Args:
        model: a prosa model (``model(ids, cache) -> logits``, ``kv_shape``).
        pool: the KV blocks.
        kernels: prosa's C++ module or None.
    """

    def __init__(self, model: nn.Module, pool: BlockPool, kernels=None):
        self.model, self.pool, self.kernels = model, pool, kernels
        self.device = pool.device
        self.step = model

    def refresh(self) -> None:
        """Pick the decode step again (the fused step is rebuilt when the model's weights were replaced)."""
        from ..decode import decode_step

        self.step = decode_step(self.model)

    def start(self, seq: Sequence, reuse: bool = True) -> None:
        """Set up ``seq`` to run ``seq.tokens[seq.offset:]`` from an empty cache: take every full block of it
        the prefix cache holds (unless ``reuse`` is False; at least one token is kept to run, which gives the
        next-token logits) and leave the rest in ``seq.pending``."""
        bs, tokens = self.pool.block_size, seq.tokens[seq.offset:]
        parent = ROOT
        for i in range((len(tokens) - 1) // bs if reuse else 0):
            hit = self.pool.lookup(parent, tokens[i * bs:(i + 1) * bs])
            if hit is None:
                break
            block, parent = hit
            seq.blocks.append(block)
            seq.hashes.append(parent)
        seq.cached = len(seq.blocks) * bs
        seq.pending = tokens[seq.cached:]

    def prefill(self, seq: Sequence, count: int, every: bool = False) -> torch.Tensor:
        """Run the next ``count`` pending tokens of ``seq``; return the logits after the last one (V,) float32, or
        with ``every`` after each of them (count, V)."""
        chunk, seq.pending = seq.pending[:count], seq.pending[count:]
        self._room(seq, seq.cached + len(chunk))
        batch = PagedBatch(self.pool, [seq.blocks], [seq.cached], self.kernels)
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        logits = self.model(ids, batch)[0]
        seq.cached += len(chunk)
        self._register(seq)
        return logits.float() if every else logits[-1].float()

    def decode(self, seqs: Seq[Sequence], tokens: torch.Tensor) -> torch.Tensor:
        """Run each sequence's newest token (``tokens`` (B,)); return the next logits (B, V) float32."""
        for s in seqs:
            self._room(s, s.cached + 1)
        batch = PagedBatch(self.pool, [s.blocks for s in seqs], [s.cached for s in seqs], self.kernels)
        logits = self.step(tokens[:, None].to(self.device), batch)[:, -1].float()
        bs = self.pool.block_size
        for s in seqs:
            s.cached += 1
            if s.cached % bs == 0:
                self._register(s)
        return logits

    def fork(self, leader: Sequence, follower: Sequence) -> None:
        """Give ``follower`` the leader's cache: its full blocks shared, its partly filled block copied."""
        bs = self.pool.block_size
        full = leader.cached // bs
        for block in leader.blocks[:full]:
            self.pool.share(block)
        follower.blocks, follower.hashes = leader.blocks[:full], list(leader.hashes)
        if leader.cached % bs:
            block = self.pool.allocate()
            self.pool.copy(leader.blocks[full], block)
            follower.blocks.append(block)
        follower.cached, follower.offset = leader.cached, leader.offset

    def release(self, seq: Sequence) -> None:
        """Give back the sequence's blocks (full ones stay in the prefix cache until evicted)."""
        self.pool.release(seq.blocks[::-1])
        seq.blocks, seq.hashes, seq.cached = [], [], 0

    def _room(self, seq: Sequence, tokens: int) -> None:
        while len(seq.blocks) * self.pool.block_size < tokens:
            seq.blocks.append(self.pool.allocate())

    def _register(self, seq: Sequence) -> None:
        """Register every block of ``seq`` that has filled since the last call."""
        bs = self.pool.block_size
        while (len(seq.hashes) + 1) * bs <= seq.cached:
            i = len(seq.hashes)
            start = seq.offset + i * bs
            seq.hashes.append(self.pool.register(seq.blocks[i], seq.hashes[-1] if seq.hashes else ROOT,
                                                 seq.tokens[start:start + bs]))


class SoloRunner:
    """Runs any ``model(ids, cache) -> logits`` with a ``make_cache(batch)``, one sequence per forward."""

    pool = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = next(model.parameters()).device

    def refresh(self) -> None:
        pass

    def start(self, seq: Sequence, reuse: bool = True) -> None:
        seq.cache, seq.cached, seq.pending = None, 0, seq.tokens[seq.offset:]

    def prefill(self, seq: Sequence, count: int, every: bool = False) -> torch.Tensor:
        chunk, seq.pending = seq.pending[:count], seq.pending[count:]
        if seq.cache is None:
            seq.cache = self.model.make_cache(1)
        logits = self.model(torch.tensor([chunk], dtype=torch.long, device=self.device), seq.cache)[0]
        seq.cached += len(chunk)
        return logits.float() if every else logits[-1].float()

    def decode(self, seqs: Seq[Sequence], tokens: torch.Tensor) -> torch.Tensor:
        rows = []
        for s, tok in zip(seqs, tokens.tolist()):
            ids = torch.tensor([[tok]], dtype=torch.long, device=self.device)
            rows.append(self.model(ids, s.cache)[0, -1].float())
            s.cached += 1
        return torch.stack(rows)

    def fork(self, leader: Sequence, follower: Sequence) -> None:
        follower.cache = copy.deepcopy(leader.cache)
        follower.cached, follower.offset = leader.cached, leader.offset

    def release(self, seq: Sequence) -> None:
        seq.cache, seq.cached = None, 0
