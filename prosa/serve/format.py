"""Engine events -> OpenAI response objects: whole responses, stream chunks, usage and both logprobs formats.

A ``Choices`` collects the events of one HTTP request (choice ``i`` = prompt ``i // n``, sample ``i % n``) and
makes the pieces the endpoints send. Token strings are ``tokenizer.decode([id])``; token bytes (chat logprobs)
are the token's exact bytes (a multi-byte character may span tokens).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine import Event
from .convert import Plan


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    error: str | None = None
    internal: bool = False          # the error was the engine's (a 500), not the request's (a 400)


class Choices:
    """The choices of one response as events arrive.

    Args:
        lm: the model (tokenizer, for token strings and bytes).
        plan: what was asked (requests, echo, logprobs).
    """

    def __init__(self, lm, plan: Plan):
        self.lm, self.plan = lm, plan
        self.n = plan.requests[0].n
        self.choices = [_Choice() for _ in range(len(plan.requests) * self.n)]
        self.id_bytes: dict[int, list[int]] = {}

    def index(self, ev: Event) -> int:
        return ev.request * self.n + ev.sample

    def add(self, ev: Event) -> _Choice:
        c = self.choices[self.index(ev)]
        if ev.prompt_logprobs is not None:
            c.prompt_logprobs = ev.prompt_logprobs
        if ev.token >= 0:
            c.tokens.append(ev.token)
            if ev.logprob is not None:
                c.logprobs.append((ev.logprob, ev.top_logprobs or []))
        c.text.append(ev.text)
        if ev.finish_reason:
            c.finish_reason, c.error, c.internal = ev.finish_reason, ev.error, ev.internal
        return c

    # -- usage ---------------------------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        prompt = sum(len(r.prompt) for r in self.plan.requests)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- token strings and bytes ------------------------------------------------------------------------------------
    def token_str(self, token: int) -> str:
        return self.lm.tokenizer.decode([token])

    def token_bytes(self, token: int) -> list[int]:
        if token not in self.id_bytes:
            try:
                from ..structured import _ll_tokenizer

                raw = _ll_tokenizer(self.lm).decode_bytes([token])
            except Exception:   # no llguidance: the UTF-8 of the decoded text
                raw = self.token_str(token).encode("utf-8")
            self.id_bytes[token] = list(raw)
        return self.id_bytes[token]

    # -- completions -------------------------------------------------------------------------------------------------
    def completion_logprobs(self, i: int, tokens: list[int], lps: list, offset: int,
                            prompt: bool = False) -> dict[str, Any]:
        """The completions ``logprobs`` object for ``tokens`` of choice ``i`` (``text_offset`` from ``offset``);
        ``prompt``: echoed prompt tokens, the first of which has no log-probability."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, tok in enumerate(tokens):
            s = self.token_str(tok)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            # an echoed prompt's first token has no log-probability (nothing before it): lps[k - 1] is for token k
            entry = None if prompt and k == 0 else lps[k - 1] if prompt else lps[k]
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(entry[0])
                out["top_logprobs"].append({self.token_str(t): lp for t, lp in entry[1]})
        return out

    def completion(self, model: str, rid: str, created: int) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            logprobs = None
            if self.plan.logprobs is not None:
                logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                offset = 0
                if self.plan.echo:
                    prompt = self.plan.requests[i // self.n].prompt
                    logprobs = self.completion_logprobs(i, prompt, c.prompt_logprobs or [], 0, prompt=True)
                    offset = len(self.plan.prompt_texts[i // self.n])
                more = self.completion_logprobs(i, c.tokens, c.logprobs, offset)
                for k in logprobs:
                    logprobs[k] += more[k]
            if self.plan.echo:
                text = self.plan.prompt_texts[i // self.n] + text
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": self.usage(), "system_fingerprint": fingerprint(self.lm)}

    # -- chat ----------------------------------------------------------------------------------------------------------
    def chat_logprobs(self, tokens: list[int], lps: list) -> dict[str, Any]:
        content = []
        for tok, (lp, top) in zip(tokens, lps):
            content.append({"token": self.token_str(tok), "logprob": lp, "bytes": self.token_bytes(tok),
                            "top_logprobs": [{"token": self.token_str(t), "logprob": v, "bytes": self.token_bytes(t)}
                                             for t, v in top]})
        return {"content": content, "refusal": None}

    def chat(self, model: str, rid: str, created: int) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.choices):
            choices.append({"index": i, "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                            "logprobs": self.chat_logprobs(c.tokens, c.logprobs) if self.plan.logprobs is not None
                            else None,
                            "finish_reason": c.finish_reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": self.usage(), "system_fingerprint": fingerprint(self.lm)}


def fingerprint(lm) -> str:
    """Identifies the backend configuration (OpenAI's ``system_fingerprint``): version and weight format."""
    from .. import __version__

    return f"prosa-{__version__}-{lm.quantize}"


def now() -> int:
    return int(time.time())
