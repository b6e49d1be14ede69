"""Samplers: processed logits + one ``torch.Generator`` per row -> tokens (B,).

Greedy rows take the argmax (ties -> lowest id); sampled rows draw one uniform number from their own generator
(inverse-CDF sampling), so a row's text does not depend on what else shares the batch and greedy rows consume no
randomness. On CPU the draw runs in prosa's C++ ``sample_rows`` kernel when it is built (``prosa.quant.kernels``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .params import SamplingParams
from .processors import NEG_INF


def _uniforms(generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """One uniform float64 in [0, 1) from each generator, on ``device``."""
    draws = [torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generators]
    if all(d.device == draws[0].device for d in draws):
        return torch.cat(draws).to(device)
    return torch.cat([d.to(device) for d in draws])


def draw(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Sample one token per row from softmax(logits), row i using only ``generators[i]`` (one uniform number,
    inverse CDF), so a row's draw depends on nothing else in the batch. Zero-probability tokens are never drawn."""
    probs = logits.softmax(dim=-1)
    uniforms = _uniforms(generators, logits.device)
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        from ..quant import kernels

        ext = kernels()
        if ext is not None and hasattr(ext, "sample_rows"):
            # The same sums in the same order in C++: no (B, V) float64 cumsum tensor (4 ms for 16 x 49k rows).
            return ext.sample_rows(probs, uniforms)
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms * cdf[:, -1]
    picked = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    # u * total can round up to the total; never step past the last token with non-zero probability.
    ids = torch.arange(logits.shape[-1], device=logits.device)
    last_positive = torch.where(probs > 0, ids, 0).amax(dim=-1)
    return torch.minimum(picked, last_positive)


class Sampler:
    """Picks one token per row: ``pick(logits (B, V) float32 after the processors, generators: one per row)``.

    Rows marked greedy take the argmax (no randomness consumed); the others ``draw`` with their own generator.
    A row whose logits are all -inf (constraints banned the whole vocabulary) is reported by ``pick``, not drawn.
    """

    def __init__(self, greedy_rows: Sequence[bool]):
        self.greedy_rows = tuple(bool(g) for g in greedy_rows)
        self._sampled = [i for i, g in enumerate(self.greedy_rows) if not g]
        self._sampled_t: dict[torch.device, torch.Tensor] = {}

    def pick(self, logits: torch.Tensor, generators: Sequence[torch.Generator]
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row; rows with nothing to pick (every logit -inf, or NaN) do not raise.

        Args:
            logits: (B, V) float32, the processed logits.
            generators: one per row (only sampled rows' are used; may be empty when every row is greedy).
        Returns:
            (tokens (B,), a (B,) bool mask of the rows with nothing to pick, or None when there are none); those
            rows' tokens are meaningless.
        """
        if logits.shape[0] != len(self.greedy_rows):
            raise ValueError(f"sampler built for {len(self.greedy_rows)} sequences, got logits for {logits.shape[0]}")
        top, tokens = logits.max(dim=-1)           # one pass: the greedy tokens (first maximum) and the check
        dead = ~(top > NEG_INF)
        if bool(dead.any()):
            logits = torch.where(dead[:, None], torch.zeros_like(logits), logits)
        else:
            dead = None
        if not self._sampled:
            return tokens, dead
        if len(generators) != len(self.greedy_rows):
            raise ValueError(f"need one generator per sequence ({len(self.greedy_rows)}), got {len(generators)}")
        gens = [generators[i] for i in self._sampled]
        if len(self._sampled) == len(self.greedy_rows):
            return draw(logits, gens), dead
        rows = self._sampled_t.get(logits.device)
        if rows is None:
            rows = self._sampled_t[logits.device] = torch.tensor(self._sampled, dtype=torch.long,
                                                                 device=logits.device)
        return tokens.index_copy(0, rows, draw(logits[rows], gens)), dead

    def __repr__(self) -> str:
        return f"Sampler(greedy_rows={list(self.greedy_rows)!r})"


def make_sampler(params: Sequence[SamplingParams]) -> Sampler:
    """The sampler for a batch whose row i follows ``params[i]`` (greedy where temperature is 0). Temperature and
    filters are processors (``make_logits_processors``); the sampler only picks."""
    return Sampler([p.greedy for p in params])
