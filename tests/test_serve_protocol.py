"""Request bodies, checked without a server: what OpenAI's description allows is accepted with OpenAI's meaning."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from prosa.serve.protocol import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field", ["n", "stream", "echo", "logprobs", "ignore_eos"])
def test_null_asks_for_the_default_where_openai_marks_a_field_nullable(field):
    # OpenAI's spec: n, stream, echo, logprobs are nullable with a default; the fuzz test found null refused
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", field: None})
    assert getattr(body, field) == CompletionRequest.model_fields[field].default
    chat = ChatCompletionRequest.model_validate({**CHAT, field: None})
    if field in ChatCompletionRequest.model_fields:
        assert getattr(chat, field) == ChatCompletionRequest.model_fields[field].default


def test_null_keeps_its_own_meaning_where_it_has_one():
    # completions' max_tokens: null = until the context is full (vLLM's reading), not the default 16
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": None}).max_tokens is None
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x"}).max_tokens == 16


@pytest.mark.parametrize("field, value", [("n", "2"), ("stream", "yes"), ("echo", 1), ("n", 0)])
def test_wrong_values_are_still_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", field: value})
