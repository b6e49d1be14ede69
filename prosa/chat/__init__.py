"""Conversations: ``Chat`` keeps a history and its KV cache between turns; ``conversation_prompt`` is the prompt
(and stop strings) of a message list, what ``prosa serve`` sends.

Two ways to turn a conversation into a prompt:

* **template mode** (the model has a chat template, from ``tokenizer_config.json`` / ``chat_template.jinja`` /
  GGUF metadata): the messages are rendered with ``prosa.chat_template`` exactly like transformers'
  ``apply_chat_template(..., add_generation_prompt=True)``; generation stops at the model's eos ids (and at the
  template's end-of-turn text, e.g. ``<|im_end|>``, when that is not a special token). A template that cannot
  render a finished exchange leaves that stop string out and says so once (a ``ChatNotice``).
* **transcript mode** (models without a template, or ``transcript=True``): a play script (``You: ...`` /
  ``He: ...`` lines); the reply ends where the model starts a new speaker line, and an empty reply is drawn again.

Every turn re-renders the whole conversation; the engine's prefix cache (``prosa.engine``) still holds the keys
and values of the previous prompt and reply, so only the tokens after their common prefix run through the model.
A conversation that outgrows the context window loses its oldest exchanges first (the system prompt is kept),
with a notice.

Submodules, imports pointing down the list:
    session.py     Chat: history, turns, retry/undo, settings, save/load
    reply.py       one reply: plan, transcript retries, streaming through the speaker filter
    prompt.py      messages -> prompt ids (template or transcript), end-of-turn stop, fitting the window, ChatNotice
    transcript.py  SpeakerLines, the streaming speaker-line cut, render_transcript (pure text)
    settings.py    check_settings, parse_setting, SETTABLE (pure; no other chat submodule)
"""
from __future__ import annotations

from .prompt import ChatNotice, conversation_prompt
from .reply import TRANSCRIPT_ATTEMPTS
from .session import Chat
from .settings import SETTABLE, check_settings, parse_setting
from .transcript import SpeakerLines, render_transcript

__all__ = ["Chat", "ChatNotice", "SETTABLE", "check_settings", "parse_setting", "SpeakerLines",
           "conversation_prompt", "render_transcript", "TRANSCRIPT_ATTEMPTS"]
