"""One reply: plan the prompt and generation arguments, stream the model's text through the transcript filter and
stripping, and draw again when a transcript reply comes out empty.

If a transcript reply comes out empty although the model did not emit eos as its very first token (e.g. it wrote
``\nYou:`` straight away), it is drawn again with the next seeds, up to ``TRANSCRIPT_ATTEMPTS`` attempts; greedy
settings (temperature 0) fall back to sampling at ``RETRY_TEMPERATURE`` for these retries, and the last attempt
bans every token holding a newline and drops a leading ``Name:`` tag instead of ending there. Only eos as the very
first token gives an empty reply by design. Imports ``prompt`` and ``transcript``, never ``session``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ..defaults import resolve, samples
from ..errors import ProsaError
from .prompt import _end_of_turn, _fit, _Options
from .transcript import SpeakerLines, _SpeakerFilter, _Trim

#: Transcript mode: attempts at a non-empty reply (the last one bans newlines).
TRANSCRIPT_ATTEMPTS = 5
RETRY_TEMPERATURE = 0.8

_NEWLINE_IDS: "weakref.WeakKeyDictionary[Any, tuple[tuple[int], ...]]" = weakref.WeakKeyDictionary()


def _newline_bans(tokenizer) -> tuple[tuple[int], ...]:
    """Every token whose text holds a newline, as ``bad_words_ids`` entries (computed once per tokenizer)."""
    if tokenizer not in _NEWLINE_IDS:
        _NEWLINE_IDS[tokenizer] = tuple((i,) for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i]))
    return _NEWLINE_IDS[tokenizer]


@dataclass
class _Outcome:
    """What one reply did (filled in while it streams)."""

    text: str = ""
    prompt: list[int] | None = None
    dropped: int = 0                 # oldest messages left out to fit the context window
    finish_reason: str | None = None
    eos_at_once: bool = False
    interrupted: bool = False
    speaker_stop: bool = False       # transcript mode: ended at a new speaker line
    attempts: int = 0


@dataclass
class _Plan:
    """One reply's prompt and generation arguments."""

    ids: list[int]
    dropped: int
    kwargs: dict[str, Any]          # for lm.stream (no seed)
    greedy: bool
    speakers: SpeakerLines | None   # transcript mode


def _plan(lm, messages: list[dict[str, str]], opts: _Options, settings: dict[str, Any],
          notice: Callable[[str], None]) -> _Plan:
    settings = dict(settings)
    settings.pop("seed", None)
    # the caller's, else the model's generation_config, else prosa's defaults (prosa.defaults: one resolver)
    resolved = resolve(lm.generation_config, {"max_new_tokens": settings.pop("max_new_tokens", None),
                                              "temperature": settings.get("temperature")})
    max_new = resolved["max_new_tokens"]
    ids, dropped = _fit(lm, messages, opts, reserve=min(max_new, lm.context_length // 4))
    if dropped:
        notice(f"the conversation outgrew the {lm.context_length}-token context window: its {dropped} oldest "
               f"message{'s' if dropped != 1 else ''} {'were' if dropped != 1 else 'was'} dropped")
    stops = list(settings.pop("stop", None) or [])
    if opts.transcript:     # the common speaker lines end generation early; _SpeakerFilter catches the rest
        stops += [f"\n{opts.user_name}:", f"\n{opts.bot_name}:"]
    else:
        marker = _end_of_turn(lm, opts.template, notice)
        if marker:
            stops.append(marker)
    speakers = SpeakerLines([opts.user_name, opts.bot_name], opts.user_name) if opts.transcript else None
    return _Plan(ids, dropped, {**settings, "stop": list(dict.fromkeys(stops)), "max_new_tokens": max_new},
                 not samples(resolved), speakers)


def _attempt_kwargs(lm, plan: _Plan, attempt: int) -> tuple[dict[str, Any], bool]:
    """Generation arguments of transcript attempt ``attempt`` (0 = as asked); (kwargs, is the last resort)."""
    kwargs = dict(plan.kwargs)
    if attempt and plan.greedy:
        kwargs["temperature"] = RETRY_TEMPERATURE
    last = attempt == TRANSCRIPT_ATTEMPTS - 1
    if last:
        bans = tuple(tuple(w) for w in kwargs.get("bad_words_ids") or ())
        kwargs["bad_words_ids"] = bans + _newline_bans(lm.tokenizer)
    return kwargs, last


class _Collector:
    """Turns one sample's streamed text into the shown reply: speaker-line cut (transcript) and stripping."""

    def __init__(self, speakers: SpeakerLines | None, strip_leading: bool = False):
        self.filter = _SpeakerFilter(speakers, strip_leading) if speakers else None
        self.trim = _Trim()
        self.pieces: list[str] = []
        self.tokens = 0
        self.first_token: int | None = None
        self.finish_reason: str | None = None
        self.speaker_stop = False
        self.done = False

    def feed(self, text: str, token_ids: Sequence[int], finish_reason: str | None) -> str:
        """Add a chunk; return the text to show now ("" if none). Sets ``done`` at the end of the reply."""
        if self.first_token is None and token_ids:
            self.first_token = token_ids[0]
        self.tokens += len(token_ids)
        stopped = False
        if self.filter is not None:
            text, stopped = self.filter.feed(text)
            if finish_reason and not stopped:
                text += self.filter.finish()
        out = self.trim.feed(text)
        if out:
            self.pieces.append(out)
        if stopped:
            self.finish_reason, self.speaker_stop, self.done = "stop", True, True
        elif finish_reason:
            self.finish_reason, self.done = finish_reason, True
        return out

    def eos_at_once(self, eos_ids) -> bool:
        return (self.finish_reason == "stop" and not self.speaker_stop and self.tokens == 1
                and self.first_token in eos_ids)

    def into(self, outcome: _Outcome, eos_ids) -> None:
        outcome.text = "".join(self.pieces)
        outcome.finish_reason, outcome.speaker_stop = self.finish_reason, self.speaker_stop
        outcome.eos_at_once = self.eos_at_once(eos_ids)


def _generate(lm, messages: list[dict[str, str]], opts: _Options, settings: dict[str, Any],
              next_seed: Callable[[], int | None],
              should_stop: Callable[[], bool], outcome: _Outcome, notice: Callable[[str], None]) -> Iterator[str]:
    """Stream one assistant reply to ``messages`` (whose last message is the user's); fills ``outcome``.

    In transcript mode an empty reply (the model did not emit eos at once) is drawn again with the next seed,
    up to ``TRANSCRIPT_ATTEMPTS`` attempts in all (see the module docstring)."""
    plan = _plan(lm, messages, opts, settings, notice)
    outcome.prompt, outcome.dropped = plan.ids, plan.dropped
    eos_ids = lm.tokenizer.eos_token_ids
    for attempt in range(TRANSCRIPT_ATTEMPTS if plan.speakers else 1):
        outcome.attempts = attempt + 1
        kwargs, last = _attempt_kwargs(lm, plan, attempt) if plan.speakers else (plan.kwargs, False)
        col = _Collector(plan.speakers, strip_leading=last)
        stream = lm.stream(plan.ids, seed=next_seed(), **kwargs)
        try:
            for chunk in stream:
                if chunk.finish_reason == "error":
                    raise ProsaError(f"the reply failed: {chunk.error}")
                out = col.feed(chunk.text, chunk.token_ids, chunk.finish_reason)
                if out:
                    yield out
                if col.done:
                    break
                if should_stop():
                    outcome.interrupted = True
                    break
        finally:
            stream.close()          # cancels the generation in the engine if it is still running
        col.into(outcome, eos_ids)
        if outcome.text or outcome.eos_at_once or outcome.interrupted or should_stop():
            return

