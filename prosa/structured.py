"""Structured output: every token constrained so that the text is JSON (any object, or one matching a schema).

``json_constraint(lm, schema)`` compiles the grammar once (llguidance, a maintained Rust library) and returns the
``Request.constraint`` factory: the engine makes one matcher per sample, asks it before each token which tokens
are allowed (forbidden ones get -inf before the sampling controls run) and tells it the token chosen. The end
token is allowed only where the JSON is complete, so a sample that stops on it has produced valid JSON (one cut by
``max_new_tokens`` has not: its finish reason is "length"). The JSON is compact: no whitespace but the separators.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np
import torch

_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _ll_tokenizer(lm):
    """llguidance's view of the model's tokenizer (built once per tokenizer: ~0.3 s for 49k tokens)."""
    import llguidance

    with _lock:
        tok = _tokenizers.get(lm.tokenizer)
        if tok is None:
            eos = sorted(lm.tokenizer.eos_token_ids)
            tok = llguidance.LLTokenizer(lm.tokenizer.backend.to_str(), n_vocab=lm.vocab_size,
                                         eos_token=eos if len(eos) != 1 else eos[0])
            _tokenizers[lm.tokenizer] = tok
        return tok


class JsonConstraint:
    """A ``Request.constraint``: calling it makes a fresh matcher for one sample."""

    def __init__(self, tokenizer, grammar: str):
        self.tokenizer, self.grammar = tokenizer, grammar

    def __call__(self) -> "_Matcher":
        import llguidance

        return _Matcher(llguidance.LLMatcher(self.tokenizer, self.grammar))


class _Matcher:
    def __init__(self, matcher):
        self.matcher = matcher

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens that keep the text within the grammar."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, bits.shape[0])
        mask[:n] = torch.from_numpy(bits[:n].astype(bool))
        return mask

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)


def json_constraint(lm, schema: dict | bool | None = None) -> JsonConstraint:
    """The constraint for JSON text: any JSON object (``schema`` None) or one valid under a JSON schema.

    Raises:
        ValueError: the schema is not one llguidance can use (the message says why), or llguidance is missing.
    """
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured output needs the llguidance package (pip install llguidance)") from None
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        # Compact JSON (", " and ": " between items, no other whitespace): a small model cannot wander off into
        # newlines and indentation until max_tokens cuts the object short.
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                defaults={"whitespace_flexible": False})
    except Exception as e:       # llguidance reports unusable schemas as exceptions of its own
        raise ValueError(f"the JSON schema cannot be used: {e}") from None
    tokenizer = _ll_tokenizer(lm)
    probe = llguidance.LLMatcher(tokenizer, grammar)
    if probe.is_error():
        raise ValueError(f"the JSON schema cannot be used: {probe.get_error()}")
    return JsonConstraint(tokenizer, grammar)
