"""``LanguageModel``: a loaded model with its tokenizer, config and generation defaults."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .generate import GenerationResult, TokenEvent, stream_generate
from .sampling import check_temperature, make_sampler
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from .tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class LanguageModel:
    """A model ready to generate: what ``prosa.load`` returns.

    Attributes:
        model: the network, ``model(input_ids, cache, attention_mask) -> logits``.
        tokenizer: its ``prosa.tokenizer.Tokenizer``.
        config: the Hugging Face config dict (from config.json or GGUF metadata).
        generation_config: generation defaults (generation_config.json), possibly empty.
        name: what it was loaded from (path or Hub id).
    """

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    path: Path | None = None

    @property
    def context_length(self) -> int:
        """Tokens the model can attend to (prompt + continuation)."""
        return self.model.context_length

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        """Distinct parameters (a tied output layer counts once)."""
        seen = {p.data_ptr(): p.numel() for p in self.model.parameters()}
        return sum(seen.values())

    def default_temperature(self) -> float:
        """transformers' rule: greedy unless generation_config.json says ``do_sample``."""
        gc = self.generation_config
        return float(gc.get("temperature") or 1.0) if gc.get("do_sample") else 0.0

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt; an empty prompt becomes the bos (or eos) token so the model has a context."""
        ids = self.tokenizer.encode(prompt)
        if not ids:
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            ids = [start if start is not None else 0]
        return ids

    def _events(self, prompts: Sequence[str], max_new_tokens: int | None, temperature: float | None,
                seed: int | None) -> tuple[list[list[int]], list[int], Iterator[TokenEvent]]:
        if max_new_tokens is None:
            max_new_tokens = self.generation_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        temperature = self.default_temperature() if temperature is None else check_temperature(temperature)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        ids = [self.encode(p) for p in prompts]
        limits = []
        for p in ids:
            if len(p) >= self.context_length:
                raise ValueError(f"the prompt is {len(p)} tokens, but the model's context window is "
                                 f"{self.context_length}; shorten the prompt")
            limits.append(min(int(max_new_tokens), self.context_length - len(p)))
        # Sequence i of a call seeded s draws from seed s + i: reproducible alone or batched.
        seeds = [seed + i for i in range(len(ids))]
        events = stream_generate(self.model, self.tokenizer, ids, sampler=make_sampler(temperature), seeds=seeds,
                                 max_new_tokens=limits, stop_ids=self.tokenizer.eos_token_ids)
        return ids, seeds, events

    def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int | None = None
                 ) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (or a batch of prompts, decoded together).

        Args:
            prompt: a string, or a list of strings.
            max_new_tokens: tokens to generate at most (default: generation_config or 128); capped by the
                context window.
            temperature: 0 = greedy; default: the model's generation_config (greedy unless do_sample).
            seed: makes sampling reproducible; sequence i of a batch uses ``seed + i``.
        Returns:
            a ``GenerationResult`` (``.text``, ``.tokens``, ``.finish_reason``), or a list for a list of prompts.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids, seeds, events = self._events(prompts, max_new_tokens, temperature, seed)
        texts = [[] for _ in prompts]
        tokens = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        for ev in events:
            if ev.token >= 0:
                tokens[ev.index].append(ev.token)
            texts[ev.index].append(ev.text)
            reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        results = [GenerationResult("".join(t), tok, r or "length", p, s)
                   for t, tok, r, p, s in zip(texts, tokens, reasons, ids, seeds)]
        return results[0] if isinstance(prompt, str) else results

    def stream(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
               seed: int | None = None) -> Iterator[str]:
        """Yield the continuation of ``prompt`` as pieces of text; joined, they equal ``generate(...).text``."""
        _, _, events = self._events([prompt], max_new_tokens, temperature, seed)
        for ev in events:
            if ev.text:
                yield ev.text
