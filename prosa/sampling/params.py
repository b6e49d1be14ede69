"""One sequence's sampling settings (``SamplingParams``) and the argument checks it shares with the processor
factories of ``prosa.sampling.processors``: every error is a ValueError that names the bad parameter and the rule,
e.g. "top_p must be in (0, 1], got 1.5"."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

MAX_LOGIT_BIAS = 100.0    # |logit_bias| limit (OpenAI's range); use bad_words_ids for a hard ban
MAX_OPENAI_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| limit (OpenAI's range)


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
