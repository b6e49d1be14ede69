"""Sampling: every decoding control as a small pure logits processor, batched with per-sequence values.

One step of decoding is ``tokens = sampler(apply(processors, logits, history), generators)``:

- ``SamplingParams``: one sequence's settings (validated; the error message names the bad parameter).
- ``TokenHistory``: the token state processors read (prompt + generated ids, "seen" and count tables), updated once
  per step with tensor ops only.
- processors: ``processor(logits (B, V) float32, history) -> logits``; each holds per-row tensors, so one list
  serves a batch whose rows have different settings. ``make_logits_processors`` builds the list and leaves out
  every processor whose setting is neutral for all rows (plain sampling costs nothing). Processors never modify
  their input; filtered tokens get ``-inf``.
- ``Sampler``: processed logits + one ``torch.Generator`` per row -> tokens (B,). Greedy rows take the argmax
  (ties -> lowest id); sampled rows draw one uniform number from their own generator (inverse-CDF sampling), so a
  row's text does not depend on what else shares the batch and greedy rows consume no randomness.

Order of application (transformers' ``_get_logits_processor`` order, with prosa's two extra controls placed
where vLLM/OpenAI put them, right after the repetition penalty)::

    logit_bias -> repetition_penalty -> presence/frequency penalty -> no_repeat_ngram -> bad_words
    -> min_new_tokens -> temperature -> top_k -> top_p -> min_p -> typical_p

The last five ("warpers") only act on sampled rows; greedy rows (temperature 0) see them as neutral, as in
transformers where warpers are not applied without ``do_sample``. Every warper keeps at least one token.

Selecting rows (finished sequences dropped, a prompt's row duplicated for n samples): ``TokenHistory.select``
works in place; processors and samplers are immutable and ``select`` returns new ones (``select(processors,
index)`` does a whole list). Rebuilding from the remaining rows' params with ``make_logits_processors`` is also
cheap (small per-row tensors only) and gives the same result.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

PAD = -1                  # filler of TokenHistory.ids left of a row's first token; never equal to a token id
MAX_LOGIT_BIAS = 100.0    # |logit_bias| limit (OpenAI's range); use bad_words_ids for a hard ban
MAX_OPENAI_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| limit (OpenAI's range)
NEG_INF = float("-inf")


# -- argument checks (shared by SamplingParams and the factories) --------------------------------------------------
def _real(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> float:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real)
    if bad or math.isnan(float(value)) or not ok(float(value)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, ok: Callable[[int], bool], rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(int(value)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def _token_id(name: str, value: Any, vocab_size: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"{name}: token ids must be integers >= 0, got {value!r}")
    if vocab_size is not None and int(value) >= vocab_size:
        raise ValueError(f"{name}: token id {int(value)} is outside the vocabulary (size {vocab_size})")
    return int(value)


def check_temperature(temperature: Any) -> float:
    """Validate ``temperature`` (finite, >= 0; 0 means greedy)."""
    return _real("temperature", temperature, lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)")


def check_top_k(k: Any) -> int:
    return _integer("top_k", k, lambda v: v >= 0, "an integer >= 0 (0 = off)")


def check_top_p(p: Any) -> float:
    return _real("top_p", p, lambda v: 0 < v <= 1, "in (0, 1]")


def check_min_p(p: Any) -> float:
    return _real("min_p", p, lambda v: 0 <= v <= 1, "in [0, 1]")


def check_typical_p(p: Any) -> float:
    return _real("typical_p", p, lambda v: 0 < v <= 1, "in (0, 1]")


def check_repetition_penalty(p: Any) -> float:
    return _real("repetition_penalty", p, lambda v: 0 < v < math.inf, "a finite number > 0 (1 = off)")


def check_presence_penalty(p: Any) -> float:
    return _real("presence_penalty", p, lambda v: abs(v) <= MAX_OPENAI_PENALTY, "in [-2, 2]")


def check_frequency_penalty(p: Any) -> float:
    return _real("frequency_penalty", p, lambda v: abs(v) <= MAX_OPENAI_PENALTY, "in [-2, 2]")


def check_no_repeat_ngram_size(n: Any) -> int:
    return _integer("no_repeat_ngram_size", n, lambda v: v >= 0, "an integer >= 0 (0 = off)")


def check_min_new_tokens(n: Any) -> int:
    return _integer("min_new_tokens", n, lambda v: v >= 0, "an integer >= 0")


def check_logit_bias(bias: Any, vocab_size: int | None = None) -> "FrozenBias | None":
    """``{token id: bias}`` -> an immutable mapping (None when empty). Ids >= 0 (and < vocab_size when given);
    biases finite, within [-100, 100] like OpenAI's API (bans belong to ``bad_words_ids``)."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping {{token id: bias}}, got {bias!r}")
    out = {}
    for tok, b in bias.items():
        tok = _token_id("logit_bias", tok, vocab_size)
        out[tok] = _real(f"logit_bias[{tok}]", b, lambda v: abs(v) <= MAX_LOGIT_BIAS, "a number in [-100, 100]")
    return FrozenBias(out) if out else None


def check_bad_words_ids(words: Any, vocab_size: int | None = None) -> tuple[tuple[int, ...], ...]:
    """A sequence of non-empty token-id sequences -> tuple of tuples."""
    if words is None:
        return ()
    if isinstance(words, (str, bytes)) or not isinstance(words, Iterable):
        raise ValueError(f"bad_words_ids must be a sequence of token-id sequences, got {words!r}")
    out = []
    for w in words:
        if isinstance(w, (str, bytes)) or not isinstance(w, Iterable) or isinstance(w, Mapping):
            raise ValueError(f"bad_words_ids must be a sequence of token-id sequences (e.g. [[12], [7, 9]]), "
                             f"got the entry {w!r}")
        ids = tuple(_token_id("bad_words_ids", t, vocab_size) for t in w)
        if not ids:
            raise ValueError("bad_words_ids: every entry must hold at least one token id, got an empty one")
        out.append(ids)
    return tuple(out)


class FrozenBias(Mapping):
    """An immutable, hashable ``{token id: bias}`` (keeps ``SamplingParams`` frozen and hashable)."""

    def __init__(self, items: Mapping[int, float]):
        self._d = dict(items)

    def __getitem__(self, key: int) -> float:
        return self._d[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __repr__(self) -> str:
        return repr(self._d)


# -- the settings of one sequence ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. Neutral defaults: plain sampling at temperature 1.

    Attributes:
        temperature: 0 = greedy (argmax; the warpers top_k/top_p/min_p/typical_p are then ignored); finite, >= 0.
        top_k: keep the k most likely tokens (ties with the k-th are kept, as transformers does); 0 = off;
            k >= the vocabulary size = off.
        top_p: nucleus: keep the most likely tokens whose mass reaches top_p; in (0, 1]; 1 = off. Ties with the
            last kept token are kept too.
        min_p: drop tokens less likely than min_p * p(most likely token); in [0, 1]; 0 = off.
        typical_p: locally typical sampling (transformers' TypicalLogitsWarper); in (0, 1]; 1 = off.
        repetition_penalty: CTRL-style over prompt + generated ids (each token once): a logit < 0 is multiplied,
            one > 0 divided by it; > 0; 1 = off.
        presence_penalty: OpenAI-style over generated ids: ``logit -= presence_penalty`` for a token generated at
            least once; in [-2, 2].
        frequency_penalty: OpenAI-style over generated ids: ``logit -= frequency_penalty * count``; in [-2, 2].
        no_repeat_ngram_size: n > 0: no n-gram of prompt + generated ids occurs twice (transformers' semantics;
            n = 1 bans every token seen); 0 = off.
        logit_bias: ``{token id: bias}`` added to the logits before everything else; biases in [-100, 100]
            (OpenAI's range; -100 all but bans, a hard ban is ``bad_words_ids``). Stored as a read-only mapping.
        bad_words_ids: token sequences never generated: a single token is always banned; a longer sequence bans its
            last token right after the rest of it was generated (or ends the prompt). A single-token entry equal
            to an eos id is ignored (transformers' NoBadWordsLogitsProcessor does the same).
        min_new_tokens: eos ids are banned until this many tokens were generated.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: Mapping[int, float] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        self._check(None)

    def _check(self, vocab_size: int | None) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        put("temperature", check_temperature(self.temperature))
        put("top_k", check_top_k(self.top_k))
        put("top_p", check_top_p(self.top_p))
        put("min_p", check_min_p(self.min_p))
        put("typical_p", check_typical_p(self.typical_p))
        put("repetition_penalty", check_repetition_penalty(self.repetition_penalty))
        put("presence_penalty", check_presence_penalty(self.presence_penalty))
        put("frequency_penalty", check_frequency_penalty(self.frequency_penalty))
        put("no_repeat_ngram_size", check_no_repeat_ngram_size(self.no_repeat_ngram_size))
        put("logit_bias", check_logit_bias(self.logit_bias, vocab_size))
        put("bad_words_ids", check_bad_words_ids(self.bad_words_ids, vocab_size))
        put("min_new_tokens", check_min_new_tokens(self.min_new_tokens))

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Check every field (values are already checked on construction; this adds the vocabulary bounds of
        logit_bias and bad_words_ids when ``vocab_size`` is given). Returns self.

        Raises:
            ValueError: naming the parameter, e.g. "top_p must be in (0, 1], got 1.5".
        """
        if vocab_size is not None:
            vocab_size = _integer("vocab_size", vocab_size, lambda v: v > 0, "an integer > 0")
        self._check(vocab_size)
        return self

    @property
    def greedy(self) -> bool:
        """True when the sequence takes the argmax (temperature 0)."""
        return self.temperature == 0


# -- per-sequence token state -------------------------------------------------------------------------------------
class TokenHistory:
    """The token state processors read, for a batch of sequences; updated once per step with tensor ops.

    Attributes:
        vocab_size, device.
        ids: (B, W) long, each row's prompt + generated ids, right-aligned; left of a row's first token: ``PAD``
            (-1). Prompt ids outside the vocabulary are kept here but ignored by ``seen``.
        lengths: (B,) long, prompt + generated tokens per row. prompt_lengths: (B,) long.
        num_generated: (B,) long, generated tokens per row (those given at construction plus those appended).
        seen: (B, V) bool, the ids in prompt + generated (built on first use, then kept up to date).
        counts: (B, V) int32, occurrences in the generated ids only (built on first use, then kept up to date).
        tokens: list of lists of ints, prompt + generated per row (a device-to-host copy; for inspection).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], vocab_size: int, device: Any = None,
                 generated: Sequence[int] | None = None):
        """Args:
            prompts: each row's ids so far.
            vocab_size, device: as the attributes.
            generated: how many of each row's last ids were generated (the rest is its prompt); default none.
                Rows joining a running batch (``prosa.engine``) have generated different amounts.
        """
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        prompts = [[int(t) for t in p] for p in prompts]
        lens = [len(p) for p in prompts]
        gen = [0] * len(prompts) if generated is None else [int(g) for g in generated]
        if len(gen) != len(prompts) or any(not 0 <= g <= n for g, n in zip(gen, lens)):
            raise ValueError("generated: one count per row, each between 0 and the row's length")
        width = max(lens, default=0)
        rows = [[PAD] * (width - len(p)) + p + [PAD] * 16 for p in prompts]
        self._buf = torch.tensor(rows, dtype=torch.long).reshape(len(prompts), width + 16).to(self.device)
        self._width = width
        self.lengths = torch.tensor(lens, dtype=torch.long, device=self.device)
        self.num_generated = torch.tensor(gen, dtype=torch.long, device=self.device)
        self.prompt_lengths = self.lengths - self.num_generated
        self._steps = 0
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self._buf.shape[0]

    @property
    def width(self) -> int:
        """Columns of ``ids`` (the longest row)."""
        return self._width

    @property
    def steps(self) -> int:
        """Tokens appended since construction (a Python int)."""
        return self._steps

    @property
    def ids(self) -> torch.Tensor:
        return self._buf[:, :self._width]

    def _table(self, ids: torch.Tensor) -> torch.Tensor:
        """Scatter indices for a (B, V + 1) table: PAD and out-of-vocabulary ids go to the spare last column."""
        v = self.vocab_size
        return torch.where((ids >= 0) & (ids < v), ids, v)

    @property
    def seen(self) -> torch.Tensor:
        if self._seen is None:
            table = torch.zeros((self.batch_size, self.vocab_size + 1), dtype=torch.bool, device=self.device)
            table.scatter_(1, self._table(self.ids), True)
            self._seen = table[:, :self.vocab_size].contiguous()
        return self._seen

    @property
    def counts(self) -> torch.Tensor:
        if self._counts is None:
            # Each row's generated ids are its last num_generated columns; other columns count into the spare one.
            col = torch.arange(self._width, device=self.device)
            mine = col[None, :] >= self._width - self.num_generated[:, None]
            gen = torch.where(mine, self._table(self.ids), self.vocab_size)
            table = torch.zeros((self.batch_size, self.vocab_size + 1), dtype=torch.int32, device=self.device)
            table.scatter_add_(1, gen, torch.ones_like(gen, dtype=torch.int32))
            self._counts = table[:, :self.vocab_size].contiguous()
        return self._counts

    @property
    def tokens(self) -> list[list[int]]:
        rows = self.ids.tolist()
        return [r[self._width - n:] if n else [] for r, n in zip(rows, self.lengths.tolist())]

    def append(self, tokens: torch.Tensor) -> None:
        """Add one new token per row: ``tokens`` (B,) of ids in [0, vocab_size)."""
        tokens = torch.as_tensor(tokens).to(device=self.device, dtype=torch.long).reshape(-1)
        if tokens.shape[0] != self.batch_size:
            raise ValueError(f"append needs one token per sequence ({self.batch_size}), got {tokens.shape[0]}")
        if self._width == self._buf.shape[1]:   # grow by doubling: amortised O(B) per step
            more = torch.full((self.batch_size, max(16, self._width)), PAD, dtype=torch.long, device=self.device)
            self._buf = torch.cat([self._buf, more], dim=1)
        self._buf[:, self._width] = tokens
        self._width += 1
        self._steps += 1
        self.lengths += 1
        self.num_generated += 1
        col = tokens[:, None]
        if self._seen is not None:
            self._seen.scatter_(1, col, True)
        if self._counts is not None:
            self._counts.scatter_add_(1, col, torch.ones_like(col, dtype=torch.int32))

    def select(self, index: torch.Tensor | Sequence[int]) -> None:
        """Keep the rows ``index`` names, in that order (rows may repeat: n copies of one prompt), in place."""
        index = _index_tensor(index, self.device)
        self.lengths = self.lengths[index]
        self.prompt_lengths = self.prompt_lengths[index]
        self.num_generated = self.num_generated[index]
        longest = int(self.lengths.max()) if index.numel() else 0
        kept = self._buf[index, self._width - longest:self._width]
        pad = torch.full((kept.shape[0], 16), PAD, dtype=torch.long, device=self.device)
        self._buf = torch.cat([kept, pad], dim=1)
        self._width = longest
        if self._seen is not None:
            self._seen = self._seen[index]
        if self._counts is not None:
            self._counts = self._counts[index]


def _index_tensor(index: torch.Tensor | Sequence[int], device: Any) -> torch.Tensor:
    if isinstance(index, torch.Tensor):
        return index.to(device=device, dtype=torch.long).reshape(-1)
    return torch.tensor([int(i) for i in index], dtype=torch.long, device=device)


def _index_list(index: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(index, torch.Tensor):
        return [int(i) for i in index.reshape(-1).tolist()]
    return [int(i) for i in index]


# -- processors ----------------------------------------------------------------------------------------------------
LogitsProcessor = Callable[[torch.Tensor, TokenHistory], torch.Tensor]


class Processor:
    """A logits processor for one batch: ``processor(logits (B, V), history) -> logits`` (a new tensor).

    ``select(index)`` returns the processor for re-selected rows (built again from the kept rows' values).
    """

    __slots__ = ("name", "values", "_fn", "_rebuild")

    def __init__(self, name: str, values: Sequence[Any], fn: LogitsProcessor,
                 rebuild: Callable[[list[int]], "Processor"]):
        self.name, self.values, self._fn, self._rebuild = name, tuple(values), fn, rebuild

    def __call__(self, logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        if logits.shape[0] != len(self.values):
            raise ValueError(f"{self.name}: built for {len(self.values)} sequences, got logits for {logits.shape[0]}")
        return self._fn(logits, history)

    def select(self, index: torch.Tensor | Sequence[int]) -> "Processor":
        return self._rebuild(_index_list(index))

    def __repr__(self) -> str:
        return f"{self.name}({list(self.values)!r})"


def _values(name: str, values: Any, check: Callable[[Any], Any]) -> list:
    """Per-row values (a sequence, or a (B,) / (B, 1) tensor) -> checked Python values."""
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name}: expected one value per sequence, got {values!r}")
    return [check(v) for v in values]


def _column(values: Sequence[float], dtype: torch.dtype, device: Any) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device).reshape(-1, 1)


def temperature(t: Sequence[float] | torch.Tensor, device: Any = None) -> Processor:
    """``logits / t`` per row; rows with t = 0 (greedy) are left as they are."""
    vals = _values("temperature", t, check_temperature)
    div = _column([v if v > 0 else 1.0 for v in vals], torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        return logits / div.to(logits.device)

    return Processor("temperature", vals, fn, lambda idx: temperature([vals[i] for i in idx], device))


def top_k(k: Sequence[int] | torch.Tensor, device: Any = None) -> Processor:
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

    return Processor("top_k", vals, fn, lambda idx: top_k([vals[i] for i in idx], device))


def top_p(p: Sequence[float] | torch.Tensor, device: Any = None) -> Processor:
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

    return Processor("top_p", vals, fn, lambda idx: top_p([vals[i] for i in idx], device))


def min_p(p: Sequence[float] | torch.Tensor, device: Any = None) -> Processor:
    """Drop tokens whose probability is below p * (the top probability); the top token always stays."""
    vals = _values("min_p", p, check_min_p)
    scale = _column(vals, torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        floor = scale.to(logits.device) * probs.amax(dim=-1, keepdim=True)
        return logits.masked_fill(probs < floor, NEG_INF)

    return Processor("min_p", vals, fn, lambda idx: min_p([vals[i] for i in idx], device))


def typical_p(p: Sequence[float] | torch.Tensor, device: Any = None) -> Processor:
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

    return Processor("typical_p", vals, fn, lambda idx: typical_p([vals[i] for i in idx], device))


def repetition_penalty(p: Sequence[float] | torch.Tensor, device: Any = None) -> Processor:
    """CTRL / transformers: every token of prompt + generated ids (once, however often it occurred) gets
    ``logit * p`` when its logit is < 0, else ``logit / p``."""
    vals = _values("repetition_penalty", p, check_repetition_penalty)
    pen = _column(vals, torch.float32, device)

    def fn(logits: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        pen_ = pen.to(logits.device)
        penalised = torch.where(logits < 0, logits * pen_, logits / pen_)
        return torch.where(history.seen, penalised, logits)

    return Processor("repetition_penalty", vals, fn, lambda idx: repetition_penalty([vals[i] for i in idx], device))


def presence_frequency_penalty(presence: Sequence[float] | torch.Tensor, frequency: Sequence[float] | torch.Tensor,
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

    return Processor("presence_frequency_penalty", list(zip(pres, freq)), fn,
                     lambda idx: presence_frequency_penalty([pres[i] for i in idx], [freq[i] for i in idx], device))


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


def no_repeat_ngram(n: Sequence[int] | torch.Tensor) -> Processor:
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

    return Processor("no_repeat_ngram", vals, fn, lambda idx: no_repeat_ngram([vals[i] for i in idx]))


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

    return Processor("bad_words", vals, fn, lambda idx: bad_words([vals[i] for i in idx], eos, device))


def min_new_tokens(n: Sequence[int] | torch.Tensor, eos_ids: Iterable[int], device: Any = None) -> Processor:
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

    return Processor("min_new_tokens", vals, fn, lambda idx: min_new_tokens([vals[i] for i in idx], eos, device))


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

    return Processor("logit_bias", vals, fn, lambda idx: logit_bias([vals[i] for i in idx], device))


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


def select(processors: Iterable[Processor], index: torch.Tensor | Sequence[int]) -> list[Processor]:
    """The processors for re-selected rows (see ``Processor.select``)."""
    index = _index_list(index)
    return [p.select(index) for p in processors]


# -- samplers ------------------------------------------------------------------------------------------------------
def greedy(logits: torch.Tensor, generators: Sequence[torch.Generator] = ()) -> torch.Tensor:
    """The most likely token of each row (ties -> lowest id, as torch.argmax and transformers do)."""
    return logits.argmax(dim=-1)


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
        from .quant import kernels

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
    """``sampler(logits (B, V) float32 after the processors, generators: one per row) -> tokens (B,) long``.

    Rows marked greedy take the argmax (no randomness consumed); the others ``draw`` with their own generator.
    A row whose logits are all -inf (constraints banned the whole vocabulary) raises ValueError.
    ``select(index)`` gives the sampler for re-selected rows.
    """

    def __init__(self, greedy_rows: Sequence[bool]):
        self.greedy_rows = tuple(bool(g) for g in greedy_rows)
        self._sampled = [i for i, g in enumerate(self.greedy_rows) if not g]
        self._sampled_t: dict[torch.device, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        tokens, dead = self.pick(logits, generators)
        if dead is not None:
            row = int(dead.nonzero()[0, 0])
            raise ValueError(f"sequence {row}: every token is banned or has probability 0 (bad_words_ids, "
                             "no_repeat_ngram_size and min_new_tokens left nothing to generate)")
        return tokens

    def pick(self, logits: torch.Tensor, generators: Sequence[torch.Generator]
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like calling the sampler, but rows with nothing to pick (every logit -inf, or NaN) do not raise:
        returns (tokens (B,), a (B,) bool mask of those rows or None when there are none); their tokens are
        meaningless."""
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

    def select(self, index: torch.Tensor | Sequence[int]) -> "Sampler":
        return Sampler([self.greedy_rows[i] for i in _index_list(index)])

    def __repr__(self) -> str:
        return f"Sampler(greedy_rows={list(self.greedy_rows)!r})"


def make_sampler(params: Sequence[SamplingParams]) -> Sampler:
    """The sampler for a batch whose row i follows ``params[i]`` (greedy where temperature is 0). Temperature and
    filters are processors (``make_logits_processors``); the sampler only picks."""
    return Sampler([p.greedy for p in params])


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sequence, seeded."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
