"""Chat templates: the Jinja templates shipped in ``tokenizer_config.json`` / ``chat_template.jinja`` / GGUF
metadata, rendered the way transformers' ``apply_chat_template`` renders them.

Templates come from the internet, so they run in jinja2's immutable sandbox; like transformers we use
``trim_blocks``/``lstrip_blocks``, a ``tojson`` that keeps non-ASCII text, and the globals ``raise_exception``
and ``strftime_now``.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

from .errors import ProsaError

Message = Mapping[str, Any]


class ChatTemplateError(ProsaError):
    """The model's chat template failed (it raised, or does not support the conversation given)."""


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja ({e}); pass another template "
                                "or use transcript mode") from None


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           special_tokens: Mapping[str, str | None] | None = None, **extra: Any) -> str:
    """Render a conversation with a chat template.

    Args:
        template: the Jinja source.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        add_generation_prompt: end with the header that starts the assistant's turn.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template expects them.
        extra: more template variables (``tools``, ``documents``, custom flags).
    Returns:
        the prompt text (special tokens as text; encode it without adding special tokens again).
    Raises:
        ChatTemplateError: the template raised (e.g. "roles must alternate").
    """
    import jinja2

    try:
        return _compile(template).render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in (special_tokens or {}).items()}, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template refused this conversation: {e}") from None


def apply_chat_template(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                        template: str | None = None, tokenize: bool = True, **extra: Any) -> str | list[int]:
    """``tokenizer.apply_chat_template`` for a prosa ``Tokenizer``: render, then (by default) encode without
    adding special tokens a second time.

    Raises:
        ChatTemplateError: the model has no template (and none was given) or the template raised.
    """
    template = template or tokenizer.chat_template
    if not template:
        raise ChatTemplateError("this model has no chat template; use transcript mode or pass a template")
    special = {name: getattr(tokenizer, name, None)
               for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    text = render(template, messages, add_generation_prompt=add_generation_prompt, special_tokens=special, **extra)
    return tokenizer.encode(text, add_special_tokens=False) if tokenize else text
