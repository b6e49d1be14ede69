"""Generation as generators all the way down:

``generate_step`` (model + sampler -> next token ids per step) -> ``stream_generate`` (token ids -> text events,
stopping) -> ``generate`` (events -> results).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .sampling import Sampler, make_generators
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from .tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """One generated sequence.

    Attributes:
        text: the continuation (special tokens removed).
        tokens: generated token ids; the final eos id is included when generation stopped on it.
        finish_reason: "stop" (eos) or "length" (max_new_tokens or the context window reached).
        prompt_tokens: the prompt's token ids.
        seed: the seed its sampling used.
    """

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class TokenEvent:
    """A step of one sequence: its new token, the text that token made printable, and the finish reason on its
    last step."""

    index: int
    token: int
    text: str
    finish_reason: str | None = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of different lengths -> (input_ids (B, T), attention_mask (B, T) or None), padded on the left so
    that every sequence's next token is the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_step(model: nn.Module, prompts: Sequence[Sequence[int]], sampler: Sampler,
                  generators: Sequence[torch.Generator], pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Prefill the prompts, then yield the next token of every sequence (B,) at each step, forever; the caller
    stops iterating.

    Args:
        model: called as ``model(input_ids, cache, attention_mask) -> logits``.
        prompts: token ids per sequence (each non-empty).
        sampler: logits (B, V) float32 + generators -> tokens (B,).
        generators: one per sequence.
        pad_id: id placed in padding slots (never attended to).
    """
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    cache = model.make_cache(len(prompts))
    logits = model(ids, cache, mask)[:, -1]
    while True:
        tokens = sampler(logits.float(), generators)
        yield tokens
        logits = model(tokens[:, None], cache)[:, -1]


def stream_generate(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], *,
                    sampler: Sampler, seeds: Sequence[int], max_new_tokens: Sequence[int],
                    stop_ids: frozenset[int] = frozenset()) -> Iterator[TokenEvent]:
    """Decode a batch and yield a ``TokenEvent`` for every token of every live sequence.

    Args:
        prompts: token ids per sequence.
        sampler: see ``prosa.sampling``.
        seeds: one per sequence.
        max_new_tokens: per sequence (already capped to the context window).
        stop_ids: token ids that end a sequence (eos).
    """
    live = [n > 0 for n in max_new_tokens]
    for i, n in enumerate(max_new_tokens):
        if n <= 0:
            yield TokenEvent(i, -1, "", "length")
    if not any(live):
        return
    detoks = [tokenizer.detokenizer() for _ in prompts]
    counts = [0] * len(prompts)
    steps = generate_step(model, prompts, sampler, make_generators(seeds), pad_id=tokenizer.pad_token_id or 0)
    try:
        for tokens in steps:
            for i, tok in enumerate(tokens.tolist()):
                if not live[i]:
                    continue
                counts[i] += 1
                text = detoks[i].add_token(tok)
                reason = "stop" if tok in stop_ids else "length" if counts[i] >= max_new_tokens[i] else None
                if reason:
                    live[i] = False
                    text += detoks[i].finalize()
                yield TokenEvent(i, tok, text, reason)
            if not any(live):
                return
    finally:
        steps.close()
