"""Conversations: ``Chat`` keeps a history and its KV cache between turns; ``reply`` answers one message list.

Two ways to turn a conversation into a prompt:

* **template mode** (the model has a chat template, from ``tokenizer_config.json`` / ``chat_template.jinja`` /
  GGUF metadata): the messages are rendered with ``prosa.chat_template`` exactly like transformers'
  ``apply_chat_template(..., add_generation_prompt=True)`` and encoded without adding special tokens again.
  Generation stops at the model's eos ids (and at the template's end-of-turn text, e.g. ``<|im_end|>``, when
  that is not a special token).
* **transcript mode** (models without a template, or ``transcript=True``): the prompt is a play script::

      {system}

      You: {message}
      He: {reply}
      You: {message}
      He:

  The reply ends where the model starts a new speaker line (``SpeakerLines``): a line beginning with
  ``You:`` / ``He:`` (the names given, any case, ``He :`` too) or with any ``Capitalised Words:`` (1 to 4
  capitalised words, at most 40 characters, then a colon), or -- after the reply's first line -- a line whose
  first word is the user's name (``You (laughing) ...``: the model speaking for the user). The first line is
  checked too (``He: You: hi`` gives no reply). ``\nYou:`` and ``\nHe:`` are also stop strings, so the common
  case ends generation in the engine. While streaming, a line that could still become a speaker line is held
  back (as stop strings are), so no part of a speaker line is ever shown. The reply is stripped at both ends
  (whitespace is held back while streaming, so the streamed pieces join to exactly the reply kept).
  If a reply comes out empty although the model did not emit eos as its very first token (e.g. it wrote
  ``\nYou:`` straight away), it is drawn again with the next seeds, up to ``TRANSCRIPT_ATTEMPTS`` attempts;
  greedy settings (temperature 0) fall back to sampling at temperature 0.8 for these retries, and the last
  attempt bans every token holding a newline and drops a leading ``Name:`` tag instead of ending there. Only
  eos as the very first token gives an empty reply by design.

Every turn re-renders the whole conversation; the engine's prefix cache (``prosa.engine``) still holds the keys
and values of the previous prompt and reply, so only the tokens after their common prefix run through the model. A conversation that
outgrows the context window loses its oldest exchanges first (the system prompt is kept), with a notice.
"""
from __future__ import annotations

import json
import math
import warnings
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence


from . import chat_template
from .errors import ProsaError
from .sampling import SamplingParams

__all__ = ["Chat", "reply", "stream_reply", "ChatNotice", "SETTABLE", "check_settings", "parse_setting",
           "SpeakerLines", "conversation_prompt"]

#: Sampling controls (``prosa.sampling.SamplingParams`` fields).
SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
#: Settings a chat keeps (``/set`` changes the scalar ones; None = the model's default).
SETTING_NAMES = ("max_new_tokens", "seed", "stop", "bad_words") + SAMPLING_FIELDS
#: Scalar settings ``/set NAME VALUE`` accepts, with their value types.
SETTABLE: dict[str, type] = {"max_new_tokens": int, "seed": int,
                             **{f.name: (int if f.type in ("int", int) else float) for f in fields(SamplingParams)
                                if f.name not in ("logit_bias", "bad_words_ids")}}
DEFAULT_MAX_NEW_TOKENS = 128
#: Transcript mode: attempts at a non-empty reply (the last one bans newlines).
TRANSCRIPT_ATTEMPTS = 5
RETRY_TEMPERATURE = 0.8
SAVE_FORMAT = "prosa-chat"
ROLES = ("system", "user", "assistant")


class ChatNotice(UserWarning):
    """Something the user should know about a conversation (e.g. old turns dropped to fit the context)."""


# -- settings --------------------------------------------------------------------------------------------------------
def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Validate chat settings (generation flags); returns a clean copy with None values dropped.

    Raises:
        ValueError: an unknown name or a bad value (the message names the parameter).
    """
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}")
    out = {k: v for k, v in settings.items() if v is not None}
    mnt = out.get("max_new_tokens")
    if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {mnt!r}")
    seed = out.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for key in ("stop", "bad_words"):
        if key in out:
            value = [out[key]] if isinstance(out[key], str) else out[key]
            if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
                raise ValueError(f"{key} must be a string or a list of strings, got {out[key]!r}")
            out[key] = [s for s in value if s]
    SamplingParams(**{k: v for k, v in out.items() if k in SAMPLING_FIELDS})   # raises ValueError naming it
    return out


def parse_setting(name: str, value: str) -> tuple[str, Any]:
    """``/set NAME VALUE`` -> (setting name, typed value); ``none``/``default`` gives None (the model's default).

    Raises:
        ValueError: an unknown name or a value of the wrong type (validation of the range is ``check_settings``).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in SETTABLE:
        raise ValueError(f"unknown setting {name!r}; settable: {', '.join(SETTABLE)}")
    value = value.strip()
    if value.lower() in ("none", "default", ""):
        return key, None
    kind = SETTABLE[key]
    try:
        if kind is int:
            return key, int(value)
        number = float(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} must be {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return key, number


# -- transcript speaker lines ----------------------------------------------------------------------------------------
_NAME_CHARS = frozenset("'’-.")


def _word_ok(word: str) -> bool:
    """Is ``word`` (non-empty) a capitalised name word?"""
    if not word[0].isupper():
        return False
    return all(ch.isalnum() or ch in _NAME_CHARS for ch in word[1:])


class SpeakerLines:
    """Recognises transcript speaker lines.

    A line (after optional spaces/tabs) is a speaker line when it starts with

    * one of ``names`` (any case, spaces allowed before the colon) and a colon, or
    * 1 to ``max_words`` capitalised words (at most ``max_len`` characters) and a colon, or
    * except on a reply's first line (which follows ``Bot:``), the user's name as a whole word (``You (laughs)``,
      ``You, ...``, a line that is just ``You``): the model speaking for the user.

    ``classify(line, first)`` says whether a line, possibly still incomplete, is one: True (it is), False (it
    cannot become one, whatever follows) or None (undecided: it could still become one).
    """

    max_words = 4
    max_len = 40

    def __init__(self, names: Sequence[str], user: str | None = None):
        self.names = [n for n in dict.fromkeys(names) if n]
        self._lower = [n.lower() for n in self.names]
        self.user = user

    def is_name(self, head: str) -> bool:
        if head.rstrip(" \t").lower() in self._lower:
            return True
        if not head or len(head) > self.max_len:
            return False
        words = head.split(" ")
        return len(words) <= self.max_words and all(w and _word_ok(w) for w in words)

    def _user_word(self, s: str) -> bool | None:
        """Does ``s`` start with the user's name as a whole word? (None: cannot tell yet.)"""
        if not self.user:
            return False
        if len(s) <= len(self.user):
            return None if self.user.startswith(s) else False
        if not s.startswith(self.user):
            return False
        nxt = s[len(self.user)]
        return not (nxt.isalnum() or nxt in "'’_-")

    def classify(self, line: str, first: bool = False) -> bool | None:
        s = line.lstrip(" \t")
        user_word = False if first else self._user_word(s)
        if user_word:
            return True
        colon = s.find(":")
        if colon >= 0:
            return self.is_name(s[:colon])
        if user_word is None and s:
            return None
        low = s.lower()
        if any(n.startswith(low) for n in self._lower) or s.rstrip(" \t").lower() in self._lower:
            return None
        if len(s) > self.max_len:
            return False
        words = s.split(" ")
        if len(words) > self.max_words:
            return False
        for i, w in enumerate(words):
            if not w:
                if i == len(words) - 1:
                    continue          # a trailing space: the next word has not started
                return False          # two spaces in a row
            if not _word_ok(w):
                return False
        return None

    def complete(self, line: str, first: bool = False) -> bool:
        """Is a finished line (nothing follows it) a speaker line?"""
        verdict = self.classify(line, first)
        return bool(verdict) or (not first and bool(self.user) and line.strip(" \t") == self.user)


class _SpeakerFilter:
    """Streams a transcript reply, cutting it before the first speaker line and holding back any line that could
    still become one. With ``strip_leading``, speaker tags at the very start are removed instead of ending it."""

    def __init__(self, speakers: SpeakerLines, strip_leading: bool = False):
        self.speakers = speakers
        self.strip_leading = strip_leading
        self.buf = ""
        self.out = 0            # buf[:out] was released
        self.line_start = 0     # start of the current (last, incomplete) line
        self.plain_line = -1    # line_start of a line already known not to be a speaker line

    def _cut(self) -> str:
        cut = max(self.line_start - 1, self.out)     # drop the newline before the speaker line too
        released = self.buf[self.out:cut]
        self.buf, self.out = self.buf[:cut], cut
        return released

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text now safe to show, whether a speaker line ended the reply)."""
        self.buf += text
        while True:
            nl = self.buf.find("\n", self.line_start)
            line = self.buf[self.line_start:nl if nl >= 0 else len(self.buf)]
            first = self.line_start == 0
            if self.plain_line == self.line_start:
                verdict = False
            elif nl >= 0:
                verdict = self.speakers.complete(line, first)
            else:
                verdict = self.speakers.classify(line, first)
            if verdict is True:
                if self.strip_leading and first:
                    s = line.lstrip(" \t")
                    self.buf = self.buf[len(line) - len(s) + s.index(":") + 1:] if ":" in s else self.buf[len(line):]
                    self.out = 0
                    continue
                return self._cut(), True
            if nl < 0:
                if verdict is False:
                    self.plain_line = self.line_start
                    hold = len(self.buf)
                else:
                    hold = max(self.line_start - 1, 0)
                break
            self.line_start = nl + 1
        hold = max(hold, self.out)
        released, self.out = self.buf[self.out:hold], hold
        return released, False

    def finish(self) -> str:
        """The text still held when generation ended (the last line is complete now)."""
        line = self.buf[self.line_start:]
        if self.plain_line != self.line_start and self.speakers.complete(line, self.line_start == 0):
            return self._cut()
        released, self.out = self.buf[self.out:], len(self.buf)
        return released


class _Trim:
    """Streams text stripped at both ends: leading whitespace dropped, trailing whitespace held until more text."""

    def __init__(self):
        self.started = False
        self.pending = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        core = text.rstrip()
        self.pending = text[len(core):]
        return core


# -- rendering --------------------------------------------------------------------------------------------------------
@dataclass
class _Options:
    transcript: bool
    template: str | None
    user_name: str
    bot_name: str


def _options(lm, transcript: bool | None, template: str | None, user_name: str, bot_name: str) -> _Options:
    template = template or getattr(lm.tokenizer, "chat_template", None)
    if transcript is None:
        transcript = not template
    if not transcript and not template:
        raise ProsaError("this model has no chat template; use transcript mode (--transcript) or pass a template")
    for what, name in (("user_name", user_name), ("bot_name", bot_name)):
        if not isinstance(name, str) or not name.strip() or ":" in name or "\n" in name:
            raise ValueError(f"{what} must be a non-empty name without ':' or newlines, got {name!r}")
    if user_name.strip() == bot_name.strip():
        raise ValueError(f"user_name and bot_name must differ, both are {user_name!r}")
    return _Options(bool(transcript), template, user_name.strip(), bot_name.strip())


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}}, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}")
        out.append({**m, "role": m["role"], "content": m["content"]})
    return out


def render_transcript(messages: Sequence[Mapping[str, str]], user_name: str = "You", bot_name: str = "He",
                      add_generation_prompt: bool = True) -> str:
    """The transcript-mode prompt of a conversation (see the module docstring)."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            if m["content"].strip():
                parts.append(m["content"].strip() + "\n\n")
        else:
            name = user_name if m["role"] == "user" else bot_name
            parts.append(f"{name}: {m['content']}\n")
    if add_generation_prompt:
        parts.append(f"{bot_name}:")
    return "".join(parts)


def _render_ids(lm, messages: Sequence[Mapping[str, str]], opts: _Options) -> list[int]:
    if opts.transcript:
        return lm.tokenizer.encode(render_transcript(messages, opts.user_name, opts.bot_name))
    text = chat_template.apply_chat_template(lm.tokenizer, messages, add_generation_prompt=True,
                                             template=opts.template, tokenize=False)
    return lm.tokenizer.encode(text, add_special_tokens=False)


def conversation_prompt(lm, messages: Sequence[Mapping[str, str]], *, transcript: bool | None = None,
                        template: str | None = None, user_name: str = "You",
                        bot_name: str = "He") -> tuple[list[int], list[str]]:
    """The prompt that asks for the assistant's next message, whole (nothing dropped), and the stop strings that
    end that message: the template's end-of-turn marker when it is plain text, the speaker lines in transcript
    mode (a base model without a template). What ``prosa serve`` sends for a chat completion.

    Raises:
        ValueError: malformed messages; ChatTemplateError: the template refused them.
    """
    opts = _options(lm, transcript, template, user_name, bot_name)
    ids = _render_ids(lm, _check_messages(messages), opts)
    if opts.transcript:
        return ids, [f"\n{opts.user_name}:", f"\n{opts.bot_name}:"]
    marker = _end_of_turn(lm, opts.template)
    return ids, [marker] if marker else []


_END_MARKERS: dict[str, str | None] = {}


def _end_of_turn(lm, template: str) -> str | None:
    """The text a template puts right after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), if it
    is plain text for this tokenizer (a special token would be an eos id or invisible in the decoded text)."""
    if template not in _END_MARKERS:
        marker = None
        probe = "Probe reply 4711."
        try:
            text = chat_template.apply_chat_template(
                lm.tokenizer, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": probe}],
                add_generation_prompt=False, template=template, tokenize=False)
            after = text[text.rfind(probe) + len(probe):].split()
            marker = after[0] if after and text.rfind(probe) >= 0 else None
        except ProsaError:
            pass
        _END_MARKERS[template] = marker
    marker = _END_MARKERS[template]
    if not marker or marker == lm.tokenizer.eos_token:
        return None
    tid = lm.tokenizer.token_to_id(marker)
    if tid is not None and tid in getattr(lm.tokenizer, "all_special_ids", ()):
        return None
    return marker


_NEWLINE_IDS: "weakref.WeakKeyDictionary[Any, tuple[tuple[int], ...]]" = weakref.WeakKeyDictionary()


def _newline_bans(tokenizer) -> tuple[tuple[int], ...]:
    """Every token whose text holds a newline, as ``bad_words_ids`` entries (computed once per tokenizer)."""
    if tokenizer not in _NEWLINE_IDS:
        _NEWLINE_IDS[tokenizer] = tuple((i,) for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i]))
    return _NEWLINE_IDS[tokenizer]


# -- generation -------------------------------------------------------------------------------------------------------
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


def _fit(lm, messages: list[dict[str, str]], opts: _Options, reserve: int) -> tuple[list[int], int]:
    """Prompt ids of the conversation, leaving out its oldest exchanges until ``reserve`` tokens of room remain
    (the system prompt and the last message are always kept). Returns (ids, messages dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    window = lm.context_length
    drop = 0
    while True:
        ids = _render_ids(lm, system + turns[drop:], opts)
        if len(ids) + reserve <= window or drop >= len(turns) - 1:
            break
        drop += 1                                          # one user message and the replies that follow it
        while drop < len(turns) - 1 and turns[drop]["role"] != "user":
            drop += 1
    if len(ids) >= window:
        raise ValueError(f"the conversation's last message and system prompt take {len(ids)} tokens but the "
                         f"context window is {window}; shorten them")
    return ids, drop


@dataclass
class _Plan:
    """One reply's prompt and generation arguments."""

    ids: list[int]
    dropped: int
    kwargs: dict[str, Any]          # for lm.stream / lm.events (no seed)
    greedy: bool
    speakers: SpeakerLines | None   # transcript mode


def _plan(lm, messages: list[dict[str, str]], opts: _Options, settings: dict[str, Any],
          notice: Callable[[str], None]) -> _Plan:
    settings = dict(settings)
    settings.pop("seed", None)
    max_new = (settings.pop("max_new_tokens", None) or lm.generation_config.get("max_new_tokens")
               or DEFAULT_MAX_NEW_TOKENS)
    ids, dropped = _fit(lm, messages, opts, reserve=min(max_new, lm.context_length // 4))
    if dropped:
        notice(f"the conversation outgrew the {lm.context_length}-token context window: its {dropped} oldest "
               f"message{'s' if dropped != 1 else ''} {'were' if dropped != 1 else 'was'} dropped")
    stops = list(settings.pop("stop", None) or [])
    if opts.transcript:     # the common speaker lines end generation early; _SpeakerFilter catches the rest
        stops += [f"\n{opts.user_name}:", f"\n{opts.bot_name}:"]
    else:
        marker = _end_of_turn(lm, opts.template)
        if marker:
            stops.append(marker)
    temperature = settings.get("temperature")
    if temperature is None:
        temperature = lm.sampling_defaults().get("temperature", 1.0)
    speakers = SpeakerLines([opts.user_name, opts.bot_name], opts.user_name) if opts.transcript else None
    return _Plan(ids, dropped, {**settings, "stop": list(dict.fromkeys(stops)), "max_new_tokens": max_new},
                 temperature == 0, speakers)


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
              should_stop: Callable[[], bool], outcome: _Outcome, notice: Callable[[str], None],
              plan: _Plan | None = None, first_attempt: int = 0) -> Iterator[str]:
    """Stream one assistant reply to ``messages`` (whose last message is the user's); fills ``outcome``.

    In transcript mode an empty reply (the model did not emit eos at once) is drawn again with the next seed,
    up to ``TRANSCRIPT_ATTEMPTS`` attempts in all (see the module docstring)."""
    if plan is None:
        plan = _plan(lm, messages, opts, settings, notice)
    outcome.prompt, outcome.dropped = plan.ids, plan.dropped
    eos_ids = lm.tokenizer.eos_token_ids
    for attempt in range(first_attempt, TRANSCRIPT_ATTEMPTS if plan.speakers else 1):
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


def _generate_many(lm, conversations: Sequence[list[dict[str, str]]], opts: _Options, settings: dict[str, Any],
                   n: int, notice: Callable[[str], None]) -> list[list[_Outcome]]:
    """``n`` replies to each conversation, all decoded together as one batch (each prompt runs once); sample j
    uses seed + j. Empty transcript replies are drawn again one by one (seeds seed + n, seed + n + 1, ...).
    Returns the outcomes per conversation."""
    plans = [_plan(lm, msgs, opts, settings, notice) for msgs in conversations]
    seed = settings.get("seed")
    if seed is None:
        import random

        seed = random.SystemRandom().randrange(2**31)
    cols = [[_Collector(plan.speakers) for _ in range(n)] for plan in plans]
    _, events = lm.events([plan.ids for plan in plans], n=n, seed=seed, **plans[0].kwargs)
    eos_ids = lm.tokenizer.eos_token_ids
    live = n * len(plans)
    try:
        for ev in events:
            col = cols[ev.request][ev.sample]
            if ev.finish_reason == "error":
                raise ProsaError(f"a reply failed: {ev.error}")
            if col.done:
                continue            # this reply has ended (a speaker line): later tokens of its row are ignored
            col.feed(ev.text, [ev.token] if ev.token >= 0 else [], ev.finish_reason)
            if col.done:
                live -= 1
                if not live:
                    break
    finally:
        events.close()          # cancels the rows still running
    results = []
    for msgs, plan, row in zip(conversations, plans, cols):
        extra = iter(range(n, 1 << 62))

        def next_seed():
            return seed + next(extra)

        outcomes = []
        for col in row:
            outcome = _Outcome(prompt=plan.ids, dropped=plan.dropped, attempts=1)
            col.into(outcome, eos_ids)
            if plan.speakers and not outcome.text and not outcome.eos_at_once:
                for _ in _generate(lm, msgs, opts, settings, next_seed, lambda: False, outcome, notice,
                                   plan=plan, first_attempt=1):
                    pass
            outcomes.append(outcome)
        results.append(outcomes)
    return results


def stream_reply(lm, messages: Sequence[Mapping[str, str]], *, transcript: bool | None = None,
                 user_name: str = "You", bot_name: str = "He", template: str | None = None,
                 on_notice: Callable[[str], None] | None = None, **settings: Any) -> Iterator[str]:
    """Stream one assistant reply to a conversation.

    Args:
        lm: a ``prosa.LanguageModel``.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, ending with the user's message.
        transcript: None = template mode when the model has a chat template, else transcript mode.
        user_name, bot_name: transcript-mode speaker names.
        template: a Jinja chat template to use instead of the model's.
        on_notice: called with notices (old messages dropped to fit the context); default ``warnings.warn``.
        settings: generation settings: max_new_tokens, seed, stop, bad_words and every
            ``prosa.sampling.SamplingParams`` field (temperature, top_k, top_p, ...); None = the model's default.
    Yields:
        the reply's text as it is generated (joined: the reply, stripped).
    Raises:
        ValueError: a bad setting, or messages that do not fit the context window.
        ChatTemplateError: the template refused the conversation.
    """
    opts = _options(lm, transcript, template, user_name, bot_name)
    msgs = _check_messages(messages)
    settings = check_settings(settings)
    seed = settings.get("seed")
    draws = iter(range(1 << 62))

    def next_seed():
        k = next(draws)
        return None if seed is None else seed + k

    notice = on_notice or _warn
    yield from _generate(lm, msgs, opts, settings, next_seed, lambda: False, _Outcome(), notice)


def reply(lm, messages: Sequence[Mapping[str, str]], *, n: int = 1, transcript: bool | None = None,
          user_name: str = "You", bot_name: str = "He", template: str | None = None,
          on_notice: Callable[[str], None] | None = None, **settings: Any) -> str | list[str]:
    """The assistant's reply to a message list: what a chat pipeline calls. Arguments as ``stream_reply``, plus
    ``n``: the number of replies (``num_return_sequences``), decoded together; reply j uses ``seed + j``.

    Returns:
        the reply (stripped), or a list of ``n`` replies when n > 1.

    >>> reply(lm, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], seed=0)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if n == 1:
        return "".join(stream_reply(lm, messages, transcript=transcript, user_name=user_name, bot_name=bot_name,
                                    template=template, on_notice=on_notice, **settings))
    opts = _options(lm, transcript, template, user_name, bot_name)
    (outcomes,) = _generate_many(lm, [_check_messages(messages)], opts, check_settings(settings), n,
                                 on_notice or _warn)
    return [o.text for o in outcomes]


def _warn(msg: str) -> None:
    warnings.warn(msg, ChatNotice, stacklevel=3)


# -- the conversation object ---------------------------------------------------------------------------------------
class Chat:
    """A conversation with a model: keeps the history, the settings and the KV cache between turns.

    Args:
        lm: a ``prosa.LanguageModel``.
        system: the system prompt (None: none; templates may add their own default).
        transcript: None = template mode when the model has a chat template, else transcript mode; True forces
            transcript mode.
        user_name, bot_name: transcript-mode speaker names (default ``You`` and ``He``).
        template: a Jinja chat template to use instead of the model's.
        on_notice: called with notices (e.g. old turns dropped to fit the context); default ``warnings.warn``.
        settings: max_new_tokens, seed, stop, bad_words and every sampling control (temperature, top_k, top_p,
            min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size,
            logit_bias, bad_words_ids, min_new_tokens); None = the model's default. With a seed, the n-th reply
            drawn in this chat (retries included) uses ``seed + n``, so a conversation replays exactly.

    Attributes:
        history: the user/assistant messages, oldest first (the system prompt is ``system``; ``messages`` has both).
        settings: the generation settings in force (``set`` changes them).
        last_prompt: the token ids of the last prompt.
    """

    def __init__(self, lm, system: str | None = None, *, transcript: bool | None = None, user_name: str = "You",
                 bot_name: str = "He", template: str | None = None,
                 on_notice: Callable[[str], None] | None = None, **settings: Any):
        self.lm = lm
        self._opts = _options(lm, transcript, template, user_name, bot_name)
        self.system = self._check_system(system)
        self.settings = check_settings(settings)
        self.history: list[dict[str, str]] = []
        self.last_prompt: list[int] = []
        self.last_outcome: _Outcome | None = None
        self.draws = 0
        self.on_notice = on_notice
        self._stop = False

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def transcript(self) -> bool:
        """True in transcript mode, False in template mode."""
        return self._opts.transcript

    @property
    def user_name(self) -> str:
        return self._opts.user_name

    @property
    def bot_name(self) -> str:
        return self._opts.bot_name

    @property
    def messages(self) -> list[dict[str, str]]:
        """The system prompt (if any) followed by the history."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + [dict(m) for m in self.history]

    @staticmethod
    def _check_system(system: Any) -> str | None:
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {system!r}")
        return system or None

    # -- turns ---------------------------------------------------------------------------------------------------
    def send(self, text: str) -> str:
        """Send a user message; return the reply (also appended to ``history``)."""
        return "".join(self.stream(text))

    def stream(self, text: str) -> Iterator[str]:
        """Send a user message; yield the reply as it is generated (nothing happens until the iteration starts).
        When the reply ends (or the iteration is stopped, or ``interrupt`` is called) the reply so far joins the
        history; a reply stopped before any text leaves no trace (the user message is dropped too)."""
        if not isinstance(text, str):
            raise ValueError(f"a message must be a string, got {text!r}")
        return self._respond(text)

    def retry(self) -> str:
        """Replace the last reply with a new one (the next seed); return it."""
        return "".join(self.stream_retry())

    def stream_retry(self) -> Iterator[str]:
        """``retry``, streamed. Stopped before any text, the old reply stays.

        Raises:
            ValueError: there is no user message to answer again.
        """
        h = self.history
        if not (h and (h[-1]["role"] == "user" or len(h) > 1 and h[-2]["role"] == "user")):
            raise ValueError("nothing to retry: the conversation has no message yet")
        return self._respond(None)

    def _respond(self, text: str | None) -> Iterator[str]:
        """Answer ``text`` (a new user message) or, with None, the last user message again (retry)."""
        previous = None
        if text is not None:
            self.history.append({"role": "user", "content": text})
        elif self.history[-1]["role"] == "assistant":
            previous = self.history.pop()
        self._stop = False
        outcome = _Outcome()
        pieces: list[str] = []

        def next_seed():
            seed = self.settings.get("seed")
            self.draws += 1
            return None if seed is None else seed + self.draws - 1

        notice = self.on_notice or _warn
        finished = False
        try:
            for piece in _generate(self.lm, self.messages, self._opts, self.settings, next_seed,
                                   lambda: self._stop, outcome, notice):
                pieces.append(piece)
                yield piece
            finished = True
        finally:
            self.last_outcome = outcome
            if outcome.prompt is not None:
                self.last_prompt = outcome.prompt
            if outcome.dropped:
                del self.history[:outcome.dropped]
            text = "".join(pieces)
            if text or (finished and not outcome.interrupted):
                self.history.append({"role": "assistant", "content": text})
            elif previous is not None:
                self.history.append(previous)           # a retry stopped before any text: keep the old reply
            elif self.history and self.history[-1]["role"] == "user":
                self.history.pop()                      # stopped before any text: as if never sent
            self._stop = False

    def interrupt(self) -> None:
        """Stop the reply being streamed at the next token (safe to call from a signal handler)."""
        self._stop = True

    def undo(self) -> list[dict[str, str]]:
        """Drop the last exchange (the last user message and the replies after it); return what was removed."""
        if not self.history:
            raise ValueError("nothing to undo: the conversation is empty")
        i = len(self.history) - 1
        while i > 0 and self.history[i]["role"] != "user":
            i -= 1
        removed, self.history = self.history[i:], self.history[:i]
        return removed

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self.history = []

    def set(self, name: str, value: Any) -> None:
        """Change one setting (None = the model's default).

        Raises:
            ValueError: an unknown name or a bad value; nothing changes then.
        """
        key = name.replace("-", "_")
        new = dict(self.settings)
        new[key] = value
        self.settings = check_settings(new)

    # -- files ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The conversation as JSON-ready data (what ``save`` writes)."""
        settings = {}
        for k, v in self.settings.items():
            if k == "logit_bias":
                v = {str(t): b for t, b in v.items()}
            elif k == "bad_words_ids":
                v = [list(w) for w in v]
            settings[k] = v
        return {"format": SAVE_FORMAT, "version": 1, "model": getattr(self.lm, "name", ""),
                "mode": "transcript" if self.transcript else "template",
                "user_name": self.user_name, "bot_name": self.bot_name, "system": self.system,
                "messages": [dict(m) for m in self.history], "settings": settings, "draws": self.draws}

    def save(self, path: str | Path) -> Path:
        """Write the conversation (system prompt, messages, settings) as JSON."""
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ProsaError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def load(self, path: str | Path) -> None:
        """Restore a conversation written by ``save`` (or a plain JSON list of messages). Nothing changes when the
        file is unreadable or invalid.

        Raises:
            ProsaError: the file cannot be read or is not a conversation (the message says why).
        """
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ProsaError(f"cannot read {path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise ProsaError(f"{path} is not valid JSON ({e})") from None
        try:
            self.from_dict(data)
        except ValueError as e:
            raise ProsaError(f"{path} is not a prosa conversation: {e}") from None

    def from_dict(self, data: Any) -> None:
        """Restore a conversation from ``to_dict`` data (or a list of messages); all-or-nothing.

        Raises:
            ValueError: the data is not a conversation.
        """
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages", []), list):
            raise ValueError("expected a JSON object with a 'messages' list (or a list of messages)")
        if data.get("format", SAVE_FORMAT) != SAVE_FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        messages = _check_messages(data.get("messages", []))
        system = self._check_system(data.get("system"))
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"] or None, messages[1:]
        if any(m["role"] == "system" for m in messages):
            raise ValueError("a system message may only come first")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        raw = data.get("settings") or {}
        if not isinstance(raw, dict):
            raise ValueError("'settings' must be an object")
        raw = dict(raw)
        if isinstance(raw.get("logit_bias"), dict):
            try:
                raw["logit_bias"] = {int(k): v for k, v in raw["logit_bias"].items()}
            except ValueError:
                raise ValueError("logit_bias keys must be token ids") from None
        settings = check_settings(raw) if "settings" in data else self.settings
        opts = self._opts
        if "mode" in data or "user_name" in data or "bot_name" in data:
            mode = data.get("mode", "transcript" if opts.transcript else "template")
            if mode not in ("transcript", "template"):
                raise ValueError(f"mode must be 'transcript' or 'template', got {mode!r}")
            opts = _options(self.lm, mode == "transcript", opts.template, data.get("user_name", opts.user_name),
                            data.get("bot_name", opts.bot_name))
        draws = data.get("draws", 0)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"draws must be an integer >= 0, got {draws!r}")
        self._opts, self.system, self.settings, self.history, self.draws = opts, system, settings, messages, draws
