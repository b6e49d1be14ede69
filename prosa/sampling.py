"""Samplers: pure functions built by factories. A sampler maps float32 logits (B, V) and one
``torch.Generator`` per sequence to the next token of each sequence (B,).

One generator per sequence makes a sequence's draws independent of whatever else shares the batch, so a
seed reproduces a text alone or batched.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Sampler = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]


def check_temperature(temperature: float) -> float:
    """Validate ``temperature`` (>= 0, finite; 0 means greedy)."""
    t = float(temperature)
    if math.isnan(t) or t < 0 or math.isinf(t):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    return t


def greedy(logits: torch.Tensor, generators: Sequence[torch.Generator] = ()) -> torch.Tensor:
    """The most likely token of each row (ties -> lowest id, as torch.argmax and transformers do)."""
    return logits.argmax(dim=-1)


def make_sampler(temperature: float = 1.0) -> Sampler:
    """A sampler drawing from softmax(logits / temperature); temperature 0 gives ``greedy``.

    Args:
        temperature: >= 0.
    Returns:
        sampler(logits (B, V) float32, generators: one per row) -> tokens (B,) long.
    """
    t = check_temperature(temperature)
    if t == 0:
        return greedy

    def sample(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        probs = torch.softmax(logits / t, dim=-1)
        # Each row draws from its own generator (CPU generators; probabilities moved to match).
        rows = [torch.multinomial(p.to(g.device), 1, generator=g) for p, g in zip(probs, generators)]
        return torch.cat(rows).to(logits.device)

    return sample


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sequence, seeded."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
