"""Choosing the next token of every row of a decode batch, each row by its own request's settings.

``Picker`` holds, for one set of rows in one order, the logits processors, the token history they read, the
sampler and the rows' generators; the engine keeps it while the batch's rows stay the same and builds a new one
when a row joins or leaves (cheap: small per-row tensors, and the history only when a processor reads it).
Every processor and the sampler work row by row, so a row picks the same token in any batch.
"""
from __future__ import annotations

from typing import Iterable, Sequence as Seq

import torch

from ..sampling import TokenHistory, apply, make_logits_processors, make_sampler
from .sequence import Sequence

# Processors that read the token history; the others (temperature, filters, logit_bias) only read logits.
_HISTORY = frozenset({"repetition_penalty", "presence_frequency_penalty", "no_repeat_ngram", "bad_words",
                      "min_new_tokens"})


class Picker:
    """Processors, history and sampler for ``rows`` (their order is the logits' row order).

    Args:
        rows: the batch's sequences.
        vocab: the logits' width.
        eos_ids: the model's end ids (a request may bring its own: rows are grouped by their end ids).
        device: the logits' device.
    """

    def __init__(self, rows: Seq[Sequence], vocab: int, eos_ids: Iterable[int], device: torch.device):
        self.rows = list(rows)
        default = frozenset(eos_ids)
        by_eos: dict[frozenset[int], list[int]] = {}
        for i, s in enumerate(self.rows):
            by_eos.setdefault(s.request.eos_ids if s.request.eos_ids is not None else default, []).append(i)
        self.groups: list[tuple[list[int], list, TokenHistory | None]] = []
        for eos, idx in by_eos.items():
            procs = make_logits_processors([self.rows[i].request.params for i in idx], eos, vocab, device)
            history = None
            if any(p.name in _HISTORY for p in procs):
                history = TokenHistory([self.rows[i].tokens for i in idx], vocab, device,
                                       generated=[self.rows[i].generated for i in idx])
            self.groups.append((idx, procs, history))
        self._whole = len(self.groups) == 1
        self.constrained = [i for i, s in enumerate(self.rows) if s.matcher is not None]
        self.sampler = make_sampler([s.request.params for s in self.rows])
        self.generators = [s.generator for s in self.rows]
        wanted = [s.request.logprobs for s in self.rows if s.request.logprobs is not None]
        self.top = max(wanted) if wanted else None

    def pick(self, logits: torch.Tensor) -> tuple[list[int], dict[int, str], list | None]:
        """Choose one token per row.

        Args:
            logits: (B, V) float32, the model's next-token logits of ``rows``.
        Returns:
            tokens (one per row), dead rows {row: why} (every token banned: their token is meaningless), and when
            some row asked for log-probabilities, per row (chosen logprob, [(id, logprob) ...]) or None.
        """
        raw = logits
        if self.constrained:       # structured output: tokens outside the grammar first, then the usual controls
            logits = self._constrain(logits)
        if self._whole:
            idx, procs, history = self.groups[0]
            processed = apply(procs, logits, history)
        else:
            processed = torch.empty_like(logits)
            for idx, procs, history in self.groups:
                rows = torch.tensor(idx, device=logits.device)
                processed[rows] = apply(procs, logits[rows], history)
        tokens, stuck = self.sampler.pick(processed, self.generators)
        dead: dict[int, str] = {}
        if stuck is not None:
            for i in stuck.nonzero()[:, 0].tolist():
                dead[i] = ("every token is banned or has probability 0 under this request's settings "
                           "(bad_words, no_repeat_ngram_size, min_new_tokens, logit_bias) or the model's logits "
                           "are not numbers; nothing can be generated")
        for idx, procs, history in self.groups:
            if history is not None:
                history.append(tokens if self._whole else tokens[torch.tensor(idx, device=tokens.device)])
        picked = tokens.tolist()
        for i in self.constrained:
            if i not in dead:
                self.rows[i].matcher.consume(picked[i])
        return picked, dead, self._logprobs(raw, tokens)

    def _constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with every token a row's matcher forbids at -inf (a new tensor)."""
        vocab = logits.shape[-1]
        rows = torch.tensor(self.constrained, device=logits.device)
        allowed = torch.stack([self.rows[i].matcher.allowed(vocab) for i in self.constrained]).to(logits.device)
        out = logits.clone()
        out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return out

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list | None:
        """Per row: (logprob of the chosen token, the ``logprobs`` most likely (id, logprob)) under the model's own
        distribution, or None for rows that did not ask."""
        if self.top is None:
            return None
        lp = torch.log_softmax(logits, dim=-1)
        chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
        if self.top:
            top_v, top_i = lp.topk(self.top, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        out = []
        for i, s in enumerate(self.rows):
            k = s.request.logprobs
            if k is None:
                out.append(None)
            else:
                out.append((chosen[i], list(zip(top_i[i][:k], top_v[i][:k])) if k else []))
        return out
