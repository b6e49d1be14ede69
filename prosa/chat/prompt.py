"""Prompt building: a conversation -> the token ids that ask for the assistant's next message.

Template mode renders the messages with ``prosa.chat_template`` exactly like transformers'
``apply_chat_template(..., add_generation_prompt=True)`` and encodes them without adding special tokens again;
the template's end-of-turn text (``<|im_end|>``, ...) is a stop string when it is plain text (``_end_of_turn``).
Transcript mode renders ``prosa.chat.transcript``'s play script. ``_fit`` leaves out the oldest exchanges until
the reply has room in the context window. Imports ``transcript`` (below it), never ``reply`` or ``session``.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .. import chat_template
from ..errors import ProsaError
from .transcript import render_transcript

ROLES = ("system", "user", "assistant")


class ChatNotice(UserWarning):
    """Something the user should know about a conversation (e.g. old turns dropped to fit the context)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, ChatNotice, stacklevel=3)


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


# template -> its end-of-turn text; filled once per process, so a template that fails the probe is reported once
_END_MARKERS: dict[str, str | None] = {}
_END_LOCK = threading.Lock()    # prosa serve renders prompts in worker threads


def _end_of_turn(lm, template: str, notice: Callable[[str], None] | None = None) -> str | None:
    """The text a template puts right after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), if it
    is plain text for this tokenizer (a special token would be an eos id or invisible in the decoded text).

    A template that cannot render the probe exchange (user, assistant) gives no marker; ``notice`` (default
    ``warnings.warn``) hears so once per process and template."""
    with _END_LOCK:
        if template not in _END_MARKERS:
            marker = None
            probe = "Probe reply 4711."
            try:
                text = chat_template.apply_chat_template(
                    lm.tokenizer, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": probe}],
                    add_generation_prompt=False, template=template, tokenize=False)
                after = text[text.rfind(probe) + len(probe):].split()
                marker = after[0] if after and text.rfind(probe) >= 0 else None
            except ProsaError as e:
                (notice or _warn)(f"the chat template failed on a finished exchange ({e}): its end-of-turn marker "
                                  "is unknown, so replies end only at the model's eos tokens and may run on past "
                                  "the end of the turn")
            _END_MARKERS[template] = marker
    marker = _END_MARKERS[template]
    if not marker or marker == lm.tokenizer.eos_token:
        return None
    tid = lm.tokenizer.token_to_id(marker)
    if tid is not None and tid in getattr(lm.tokenizer, "all_special_ids", ()):
        return None
    return marker


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

