"""Logits processors: every decoding control as a small pure function over a batch, with per-row values.

A processor is ``processor(logits (B, V) float32, history) -> logits``; each holds per-row tensors, so one list
serves a batch whose rows have different settings. ``make_logits_processors`` builds the list and leaves out
every processor whose setting is neutral for all rows (plain sampling costs nothing). Processors never modify
their input; filtered tokens get ``-inf``.

Order of application (transformers' ``_get_logits_processor`` order, with prosa's two extra controls placed
where vLLM/OpenAI put them, right after the repetition penalty)::

    logit_bias -> repetition_penalty -> presence/frequency penalty -> no_repeat_ngram -> bad_words
    -> min_new_tokens -> temperature -> top_k -> top_p -> min_p -> typical_p

The last five ("warpers") only act on sampled rows; greedy rows (temperature 0) see them as neutral, as in
transformers where warpers are not applied without ``do_sample``. Every warper keeps at least one token.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import torch

from .history import TokenHistory
from .params import (SamplingParams, check_bad_words_ids, check_frequency_penalty, check_logit_bias,
                     check_min_new_tokens, check_min_p, check_no_repeat_ngram_size, check_presence_penalty,
                     check_repetition_penalty, check_temperature, check_top_k, check_top_p, check_typical_p)

NEG_INF = float("-inf")

LogitsProcessor = Callable[[torch.Tensor, TokenHistory], torch.Tensor]


class Processor:
    """A logits processor for one batch: ``processor(logits (B, V), history) -> logits`` (a new tensor).

    Args:
        name: the control it applies (``prosa.engine.batch`` tells by it which processors read the history).
        values: its per-row settings (one per sequence; the batch size it accepts).
        fn: ``fn(logits, history) -> logits``, the filter itself.
    """

    __slots__ = ("name", "values", "_fn")

    def __init__(self, name: str, values: Sequence[Any], fn: LogitsProcessor):
        self.name, self.values, self._fn = name, tuple(values), fn

    def __call__(self, logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        if logits.shape[0] != len(self.values):
            raise ValueError(f"{self.name}: built for {len(self.values)} sequences, got logits for {logits.shape[0]}")
        return self._fn(logits, history)

    def __repr__(self) -> str:
        return f"{self.name}({list(self.values)!r})"


def _values(name: str, values: Any, check: Callable[[Any], Any]) -> list:
    """Per-row values (a sequence) -> checked Python values."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name}: expected one value per sequence, got {values!r}")
    return [check(v) for v in values]


def _column(values: Sequence[float], dtype: torch.dtype, device: Any) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device).reshape(-1, 1)


def temperature(t: Sequence[float], device: Any = None) -> Processor:
    """``logits / t`` per row; rows with t = 0 (greedy) are left as they are."""
    vals = _values("temperature", t, check_temperature)
    div = _column([v if v > 0 else 1.0 for v in vals], torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        return logits / div.to(logits.device)

    return Processor("temperature", vals, fn)


def top_k(k: Sequence[int], device: Any = None) -> Processor:
    """Keep each row's k highest logits and every logit tied with the k-th (as transformers); k = 0 or k >= the
    vocabulary size: the row is unchanged."""
    vals = _values("top_k", k, check_top_k)
    kk = _column(vals, torch.long, device)
    off = kk == 0
    kmax = max(vals, default=0)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        n = min(kmax, logits.shape[-1])
        if n == 0:
            return logits
        kth = torch.topk(logits, n, dim=-1).values.gather(1, (kk.to(logits.device).clamp(1, n) - 1))
        kth = kth.masked_fill(off.to(logits.device), NEG_INF)
        return logits.masked_fill(logits < kth, NEG_INF)

    return Processor("top_k", vals, fn)


def top_p(p: Sequence[float], device: Any = None) -> Processor:
    """Nucleus filtering, transformers' maths: sort ascending, drop tokens while the cumulative probability is
    <= 1 - p, always keep the most likely. Unlike transformers (whose unstable sort splits a tie arbitrarily),
    every token tied with the least likely kept token is kept. p = 1: the row is unchanged."""
    vals = _values("top_p", p, check_top_p)
    # 1 - p computed in double then rounded to float32, exactly like transformers' `cumsum <= (1 - top_p)`.
    drop_upto = _column([1.0 - v if v < 1 else -1.0 for v in vals], torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        ascending = torch.sort(logits, dim=-1).values
        cum = ascending.softmax(dim=-1).cumsum(dim=-1)
        dropped = (cum <= drop_upto.to(logits.device)).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        return logits.masked_fill(logits < ascending.gather(1, dropped), NEG_INF)

    return Processor("top_p", vals, fn)


def min_p(p: Sequence[float], device: Any = None) -> Processor:
    """Drop tokens whose probability is below p * (the top probability); the top token always stays."""
    vals = _values("min_p", p, check_min_p)
    scale = _column(vals, torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        floor = scale.to(logits.device) * probs.amax(dim=-1, keepdim=True)
        return logits.masked_fill(probs < floor, NEG_INF)

    return Processor("min_p", vals, fn)


def typical_p(p: Sequence[float], device: Any = None) -> Processor:
    """Locally typical sampling (transformers' TypicalLogitsWarper): rank tokens by |-log p - entropy|, keep the
    best-ranked ones until their mass reaches p (plus any tied with the last kept). p = 1: unchanged."""
    vals = _values("typical_p", p, check_typical_p)
    mass = _column(vals, torch.float32, device)
    off = mass >= 1

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
        distance = (-logp - entropy).abs()
        ranked, order = torch.sort(distance, dim=-1)
        cum = logits.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cum < mass.to(logits.device)).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        drop = (distance > ranked.gather(1, last)) & ~off.to(logits.device)
        return logits.masked_fill(drop, NEG_INF)

    return Processor("typical_p", vals, fn)


def repetition_penalty(p: Sequence[float], device: Any = None) -> Processor:
    """CTRL / transformers: every token of prompt + generated ids (once, however often it occurred) gets
    ``logit * p`` when its logit is < 0, else ``logit / p``."""
    vals = _values("repetition_penalty", p, check_repetition_penalty)
    pen = _column(vals, torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        pen_ = pen.to(logits.device)
        penalised = torch.where(logits < 0, logits * pen_, logits / pen_)
        return torch.where(history.seen, penalised, logits)

    return Processor("repetition_penalty", vals, fn)


def presence_frequency_penalty(presence: Sequence[float], frequency: Sequence[float],
                               device: Any = None) -> Processor:
    """OpenAI: ``logit -= frequency * count + presence * (count > 0)``, counts over the generated ids only."""
    pres = _values("presence_penalty", presence, check_presence_penalty)
    freq = _values("frequency_penalty", frequency, check_frequency_penalty)
    if len(pres) != len(freq):
        raise ValueError(f"presence_penalty and frequency_penalty need one value per sequence each, got "
                         f"{len(pres)} and {len(freq)}")
    pres_t, freq_t = _column(pres, torch.float32, device), _column(freq, torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        counts = history.counts
        penalty = freq_t.to(logits.device) * counts.to(logits.dtype) + pres_t.to(logits.device) * (counts > 0)
        return logits - penalty

    return Processor("presence_frequency_penalty", list(zip(pres, freq)), fn)


def _ngram_bans(ids: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor | None:
    """(b, V) bool: tokens that would complete an n-gram already present in ``ids`` (left-padded with PAD)."""
    width = ids.shape[1]
    if width < n:
        return None
    prefix = ids[:, width - n + 1:]                                  # the last n - 1 tokens
    windows = ids.unfold(1, n, 1)                                    # every n-gram (b, width - n + 1, n)
    match = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)
    last = windows[..., -1]
    # A prefix holding PAD never matches a real window (PAD only occurs left of a row's first token).
    target = torch.where(match & (last >= 0) & (last < vocab_size), last, vocab_size)
    bans = torch.zeros((ids.shape[0], vocab_size + 1), dtype=torch.bool, device=ids.device)
    return bans.scatter_(1, target, True)[:, :vocab_size]


def no_repeat_ngram(n: Sequence[int]) -> Processor:
    """transformers' NoRepeatNGram over prompt + generated ids, per row n (0 = off): ban every token that would
    complete an n-gram that already occurs."""
    vals = _values("no_repeat_ngram_size", n, check_no_repeat_ngram_size)
    groups: dict[int, list[int]] = {}
    for row, size in enumerate(vals):
        if size > 0:
            groups.setdefault(size, []).append(row)
    whole = len(groups) == 1 and len(next(iter(groups.values()))) == len(vals)
    rows_of = {size: torch.tensor(rows, dtype=torch.long) for size, rows in groups.items()}

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        ids, vocab = history.ids, logits.shape[-1]
        if whole:
            bans = _ngram_bans(ids, next(iter(groups)), vocab)
            return logits if bans is None else logits.masked_fill(bans, NEG_INF)
        all_bans = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for size, rows in rows_of.items():
            rows = rows.to(ids.device)
            bans = _ngram_bans(ids[rows], size, vocab)
            if bans is not None:
                all_bans[rows] = bans
        return logits.masked_fill(all_bans, NEG_INF)

    return Processor("no_repeat_ngram", vals, fn)


def bad_words(words: Sequence[Sequence[Sequence[int]]], eos_ids: Iterable[int] = (), device: Any = None) -> Processor:
    """transformers' NoBadWords, per row: ``words[row]`` holds that row's banned token sequences. A one-token
    sequence is always banned (unless it is an eos id: those entries are ignored, as in transformers); a longer
    one bans its last token whenever the row's ids end with the rest of it."""
    vals = _values("bad_words_ids", words, check_bad_words_ids)
    eos = {int(e) for e in eos_ids}
    single: list[tuple[int, int]] = []
    multi: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for row, seqs in enumerate(vals):
        for seq in seqs:
            if len(seq) == 1:
                if seq[0] not in eos:
                    single.append((row, seq[0]))
            else:
                multi.setdefault(len(seq) - 1, []).append((row, seq))
    single_rows = torch.tensor([r for r, _ in single], dtype=torch.long, device=device)
    single_ids = torch.tensor([t for _, t in single], dtype=torch.long, device=device)
    groups = [(m, torch.tensor([r for r, _ in entries], dtype=torch.long, device=device),
               torch.tensor([s[:-1] for _, s in entries], dtype=torch.long, device=device),
               torch.tensor([s[-1] for _, s in entries], dtype=torch.long, device=device))
              for m, entries in multi.items()]

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        vocab, dev = logits.shape[-1], logits.device
        bans = torch.zeros((logits.shape[0], vocab + 1), dtype=torch.bool, device=dev)
        if single:
            ids = single_ids.to(dev)
            bans[single_rows.to(dev), torch.where(ids < vocab, ids, vocab)] = True
        ids = history.ids
        for m, rows, prefixes, last in groups:
            if m > ids.shape[1]:
                continue
            rows, last = rows.to(ids.device), last.to(dev)
            match = (ids[:, ids.shape[1] - m:][rows] == prefixes.to(ids.device)).all(dim=-1).to(dev)
            bans[rows.to(dev), torch.where(match & (last < vocab), last, vocab)] = True
        return logits.masked_fill(bans[:, :vocab], NEG_INF)

    return Processor("bad_words", vals, fn)


def min_new_tokens(n: Sequence[int], eos_ids: Iterable[int], device: Any = None) -> Processor:
    """Ban every eos id in a row until it has generated n tokens (``history.num_generated``)."""
    vals = _values("min_new_tokens", n, check_min_new_tokens)
    eos = sorted({int(e) for e in eos_ids})
    need = torch.tensor(vals, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        if not eos:
            return logits
        dev, vocab = logits.device, logits.shape[-1]
        ids = eos_t.to(dev)
        ids = ids[ids < vocab]
        mask = torch.zeros(vocab, dtype=torch.bool, device=dev)
        mask[ids] = True
        active = (history.num_generated.to(dev) < need.to(dev))[:, None]
        return logits.masked_fill(active & mask, NEG_INF)

    return Processor("min_new_tokens", vals, fn)


def logit_bias(biases: Sequence[Mapping[int, float] | None], device: Any = None) -> Processor:
    """Add ``biases[row][token]`` to the row's logits (ids must be < the vocabulary size at call time)."""
    vals = _values("logit_bias", biases, check_logit_bias)
    entries = [(row, tok, b) for row, bias in enumerate(vals) for tok, b in (bias or {}).items()]
    rows = torch.tensor([r for r, _, _ in entries], dtype=torch.long, device=device)
    toks = torch.tensor([t for _, t, _ in entries], dtype=torch.long, device=device)
    adds = torch.tensor([b for _, _, b in entries], dtype=torch.float32, device=device)
    top = max((t for _, t, _ in entries), default=-1)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        if not entries:
            return logits
        if top >= logits.shape[-1]:
            raise ValueError(f"logit_bias: token id {top} is outside the vocabulary (size {logits.shape[-1]})")
        dev = logits.device
        return logits.index_put((rows.to(dev), toks.to(dev)), adds.to(device=dev, dtype=logits.dtype),
                                accumulate=True)

    return Processor("logit_bias", vals, fn)


def make_logits_processors(params: Sequence[SamplingParams], eos_ids: Iterable[int], vocab_size: int,
                           device: Any = None) -> list[Processor]:
    """The processors for a batch whose row i follows ``params[i]``, in application order (see the module
    docstring), leaving out each processor that is neutral for every row. Greedy rows get neutral warper values.

    Args:
        params: one per row (validated here against ``vocab_size``).
        eos_ids: the ids ``min_new_tokens`` bans (and that single-token ``bad_words_ids`` may not ban).
        vocab_size: the logits' last dimension.
        device: where the per-row tensors live (the logits' device).
    """
    params = [p.validate(vocab_size) for p in params]
    eos = sorted({int(e) for e in eos_ids if 0 <= int(e) < vocab_size})
    out: list[Processor] = []
    if any(p.logit_bias for p in params):
        out.append(logit_bias([p.logit_bias for p in params], device))
    if any(p.repetition_penalty != 1 for p in params):
        out.append(repetition_penalty([p.repetition_penalty for p in params], device))
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        out.append(presence_frequency_penalty([p.presence_penalty for p in params],
                                              [p.frequency_penalty for p in params], device))
    if any(p.no_repeat_ngram_size for p in params):
        out.append(no_repeat_ngram([p.no_repeat_ngram_size for p in params]))
    if any(w for p in params for w in p.bad_words_ids if len(w) > 1 or w[0] not in eos):
        out.append(bad_words([p.bad_words_ids for p in params], eos, device))
    if eos and any(p.min_new_tokens for p in params):
        out.append(min_new_tokens([p.min_new_tokens for p in params], eos, device))
    sampled = [not p.greedy for p in params]
    warpers: list[tuple[Callable[..., Processor], list, Callable[[Any], bool]]] = [
        (temperature, [p.temperature if s else 1.0 for p, s in zip(params, sampled)], lambda v: v != 1),
        (top_k, [p.top_k if s and p.top_k < vocab_size else 0 for p, s in zip(params, sampled)], bool),
        (top_p, [p.top_p if s else 1.0 for p, s in zip(params, sampled)], lambda v: v < 1),
        (min_p, [p.min_p if s else 0.0 for p, s in zip(params, sampled)], bool),
        (typical_p, [p.typical_p if s else 1.0 for p, s in zip(params, sampled)], lambda v: v < 1),
    ]
    for factory, vals, active in warpers:
        if any(active(v) for v in vals):
            out.append(factory(vals, device))
    return out


def apply(processors: Iterable[LogitsProcessor], logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
    """Run ``logits`` through every processor in order."""
    for proc in processors:
        logits = proc(logits, history)
    return logits
