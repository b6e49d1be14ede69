"""OpenAI request bodies -> prosa engine ``Request``s (and the prompt texts the responses need).

Fields the client leaves out take the model's generation_config, else OpenAI's defaults (temperature 1, top_p 1;
completions 16 tokens; a chat reply runs until it ends or the window fills): ``prosa.defaults.resolve``. Every
check is made here, before anything reaches the engine; a failure is a ``ServeError`` 400 naming the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..defaults import resolve
from ..engine import Request
from .protocol import ChatCompletionRequest, CompletionRequest, ServeError

# prosa's extra body fields -> LanguageModel.make_requests arguments
_EXTRAS = {"top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "repetition_penalty": "repetition_penalty",
           "no_repeat_ngram_size": "no_repeat_ngram_size", "min_tokens": "min_new_tokens", "bad_words": "bad_words"}


@dataclass
class Plan:
    """What one HTTP request runs: its engine requests (one per prompt) and what the responses need."""

    requests: list[Request]
    prompt_texts: list[str] = field(default_factory=list)    # completions with echo: each prompt's text
    logprobs: int | None = None                                 # alternatives per token, when asked
    echo: bool = False


def _settings(lm, body, max_new: int | None) -> dict[str, Any]:
    """make_requests keyword arguments for the fields both endpoints share.

    Fields the client leaves out: the model's generation_config, else OpenAI's documented defaults (temperature
    1, top_p 1), through ``prosa.defaults.resolve`` like every other front-end; ``max_new`` is the endpoint's.
    """
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k}
    resolved = resolve(lm.generation_config, given, "openai")
    kw: dict[str, Any] = {k: resolved[k] for k in ("temperature", "top_p", "top_k", "min_p", "typical_p",
                                                   "repetition_penalty", "no_repeat_ngram_size") if k in resolved}
    kw.update({"n": body.n, "seed": body.seed, "stop": body.stop, "ignore_eos": body.ignore_eos,
               "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
               "max_new_tokens": max_new})
    for name, arg in _EXTRAS.items():
        value = getattr(body, name)
        if value is not None:
            kw[arg] = value
    if body.logit_bias:
        kw["logit_bias"] = {int(k): float(v) for k, v in body.logit_bias.items()}
    return kw


def _make(lm, prompts: list[list[int]], kw: dict[str, Any]) -> list[Request]:
    """``lm.make_requests`` with its ValueErrors as 400s naming the parameter (the first word of the message)."""
    try:
        return lm.make_requests(prompts, **kw)
    except ValueError as e:
        message = str(e)
        param = message.split(" ", 1)[0].rstrip(":")
        names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "bad_words_ids": "bad_words"}
        raise ServeError(400, message, param=names.get(param, param)) from None


def _check_window(lm, ids: list[int], max_new: int | None, param: str) -> None:
    window = lm.context_length
    if len(ids) >= window:
        raise ServeError(400, f"the prompt is {len(ids)} tokens but this model's context window is {window}; "
                              "shorten it", param=param, code="context_length_exceeded")
    if max_new is not None and len(ids) + max_new > window:
        raise ServeError(400, f"this model's context window is {window} tokens, but {len(ids)} prompt tokens + "
                              f"{max_new} to generate were requested; lower max_tokens",
                         param="max_tokens", code="context_length_exceeded")


def _token_ids(lm, ids: list[int]) -> list[int]:
    vocab = lm.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ServeError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return ids


def completion_plan(lm, body: CompletionRequest) -> Plan:
    """The engine requests of a ``/v1/completions`` body: one per prompt (strings, a list of strings, token ids,
    or a list of token-id lists), each with ``n`` samples."""
    p = body.prompt
    if p is None:               # a new document: the model's start (or end-of-text) token
        tok = lm.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids, default=0)
        p = [start]
    if isinstance(p, str):
        raw: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        raw = [list(p)]
    else:
        raw = list(p)
    prompts, texts = [], []
    for x in raw:
        if isinstance(x, str):
            ids = lm.tokenizer.encode(x)
            if not ids:
                raise ServeError(400, "the prompt is empty", param="prompt")
            prompts.append(ids)
            texts.append(x)
        else:
            prompts.append(_token_ids(lm, list(x)))
            texts.append(lm.tokenizer.decode(x))
    max_new = body.max_tokens
    for ids in prompts:
        _check_window(lm, ids, max_new, "prompt")
    until_full = min(lm.context_length - len(ids) for ids in prompts)      # max_tokens: null
    kw = _settings(lm, body, max_new if max_new is not None else until_full)
    kw["logprobs"] = body.logprobs
    requests = _make(lm, prompts, kw)
    if body.echo and body.logprobs is not None:
        for r in requests:
            r.prompt_logprobs = body.logprobs
    return Plan(requests, texts, body.logprobs, body.echo)


def chat_plan(lm, body: ChatCompletionRequest, structured=None) -> Plan:
    """The engine request of a ``/v1/chat/completions`` body: the conversation rendered with the model's chat
    template (transcript mode for a base model, as ``prosa chat``), its end-of-turn marker as a stop string, and
    ``response_format`` as a grammar constraint."""
    from ..chat import conversation_prompt
    from ..errors import ProsaError

    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        ids, stops = conversation_prompt(lm, messages)
    except (ValueError, ProsaError) as e:
        raise ServeError(400, f"the messages cannot be rendered: {e}", param="messages") from None
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    _check_window(lm, ids, max_new, "messages")
    kw = _settings(lm, body, max_new if max_new is not None else lm.context_length - len(ids))
    user_stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    kw["stop"] = user_stops + [s for s in stops if s not in user_stops]
    kw["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
    (req,) = _make(lm, [ids], kw)
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        from ..structured import json_constraint

        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        if fmt.type == "json_schema" and schema is None:
            schema = {}
        try:
            req.constraint = json_constraint(lm, schema)
        except ValueError as e:
            raise ServeError(400, str(e), param="response_format") from None
    return Plan([req], [], req.logprobs, False)
