"""What the engine decodes: requests, the events it sends back, and the state of each sequence.

A ``Request`` is one prompt with its settings; it becomes ``n`` ``Sequence``s (its samples), each with its own
token history, sampler generator, stop matcher, detokenizer, length limit and KV blocks. The first sample
(the leader) runs the prompt through the model; the others fork from it when its prefill is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence as Seq

import torch

from ..sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import Handle

OVERFLOW_MODES = ("error", "slide")
# The stop_reason of a sample that ended ("length") because prompt + output filled the context window before
# max_new_tokens did (finish_reason stays "length", as OpenAI's API has it).
CONTEXT = "context"


@dataclass
class Request:
    """One prompt to continue.

    Attributes:
        prompt: token ids (non-empty).
        params: sampling controls.
        max_new_tokens: tokens to generate at most, per sample.
        stop: strings that end generation; never part of the text.
        n: samples of this prompt; the prompt is prefilled once and its cache shared.
        seed: sample ``j`` draws from a generator seeded ``seed + j``.
        logprobs: None for none; k >= 0 for the chosen token's log-probability and the k most likely alternatives.
        ignore_eos: keep going past eos (benchmarks).
        context_overflow: "error": a sample stops ("length") when prompt + output fill the context window;
            "slide": its oldest tokens are dropped (the window restarts from its most recent half) and it goes on.
        eos_ids: the ids that end a sample; None means the tokenizer's.
        skip_special_tokens: leave special tokens out of the text (as ``tokenizer.decode`` does by default).
        constraint: makes one matcher per sample that restricts its tokens (structured output, see
            ``prosa.structured``): ``matcher.allowed(vocab) -> (vocab,) bool`` before each token,
            ``matcher.consume(token)`` after.
        prompt_logprobs: k >= 0: also the log-probability of every prompt token after the first (and the k most
            likely alternatives at each place), on each sample's first event; the prompt then runs whole (no
            prefix-cache reuse).
    """

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False
    context_overflow: str = "error"
    eos_ids: frozenset[int] | None = None
    skip_special_tokens: bool = True
    constraint: Callable[[], Any] | None = None
    prompt_logprobs: int | None = None


@dataclass
class Event:
    """One generated token of one sequence (or the end of a sequence that generated none).

    Attributes:
        seq: sequence number within the call (request-major: request r's samples follow all samples of r - 1).
        request, sample: which request of the call and which of its n samples.
        token: the token id; -1 when the sequence ended without a new token (length 0, error, cancel).
        text: text this token made final (may be empty: held back for a multi-byte character or a possible
            stop string; on the last event, whatever was held, less the bytes of an unfinished last character:
            never a U+FFFD for a character the end cut in two).
        logprob, top_logprobs: when requested: log-probability of ``token`` and the most likely (id, logprob)
            pairs, under the model's own distribution (before temperature and filters).
        finish_reason: on the sequence's last event: "stop" (eos or a stop string), "length" (max_new_tokens or
            the context window), "error" (see ``error``) or "cancelled"; else None.
        stop_reason: the stop string or eos id that ended it; with finish_reason "length", ``CONTEXT`` ("context")
            when the context window ended it before max_new_tokens (None: max_new_tokens did).
        error: what went wrong, with finish_reason "error".
        internal: with an error, whether it was the engine's own failure (the model could not run the prompt or
            the step: a server error, not the request's fault).
        prompt_logprobs: on a sample's first event when the request asked: (logprob, top alternatives) of each
            prompt token after the first.
    """

    seq: int
    request: int
    sample: int
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    internal: bool = False
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the stop string found or None)."""
        if not self.stops:
            return text, None
        buf = self.pending + text
        found = [(buf.find(s), s) for s in self.stops if s in buf]
        if found:
            at, stop = min(found)
            self.pending = ""
            return buf[:at], stop
        hold = 0
        for s in self.stops:   # longest tail of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], None

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class Sequence:
    """One sample of a request, as the engine tracks it.

    Attributes:
        handle: the request's ``Handle``; sample: which of its samples.
        tokens: prompt + generated ids.
        offset: ``tokens[offset]`` is at cache position 0 (0 until the context window slides).
        generated: tokens generated so far; limit: the most it may generate.
        cached: tokens whose keys/values are in the cache (its first ``cached`` tokens).
        pending: tokens still to run through the model before it can sample (its prompt, in chunks).
        blocks: its block table; hashes: the prefix-cache hash of each registered full block.
        reserve: blocks set aside for it at admission (it never holds more).
        logits: (V,) next-token logits once its prompt is done, until it samples.
        cache: its own cache, for models the paged cache does not serve (``SoloRunner``).
        matcher: its structured-output state (``Request.constraint``), or None.
    """

    def __init__(self, handle: "Handle", sample: int, tokens: list[int], limit: int, detok: Any,
                 generator: torch.Generator):
        self.handle, self.sample = handle, sample
        self.tokens = tokens
        self.generated = 0
        self.limit = limit
        self.detok = detok
        self.stop = StopMatcher(handle.request.stop)
        self.generator = generator
        self.offset = 0           # tokens[offset] sits at cache position 0 (moves on when the window slides)
        self.cached = 0
        self.pending: list[int] = []
        self.blocks: list[int] = []
        self.hashes: list[int] = []
        self.reserve = 0
        self.logits: torch.Tensor | None = None
        self.cache: Any = None
        self.matcher = handle.request.constraint() if handle.request.constraint is not None else None
        self.prompt_logprobs: list | None = [] if handle.request.prompt_logprobs is not None else None
        self.last_token_time: float | None = None
        self.done = False

    @property
    def request(self) -> Request:
        return self.handle.request

    def __repr__(self) -> str:
        return (f"Sequence(request={self.handle.id}, sample={self.sample}, tokens={len(self.tokens)}, "
                f"cached={self.cached}, generated={self.generated})")
