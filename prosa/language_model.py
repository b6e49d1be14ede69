"""``LanguageModel``: a loaded model with its tokenizer, config and generation defaults, and the generation API."""
from __future__ import annotations

import numbers
import queue
import random
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch

from .defaults import resolve
from .engine import OVERFLOW_MODES, Engine, Event, Request
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MAX_LOGPROBS = 20            # alternatives per token at most (OpenAI's chat limit)
MAX_N = 128                  # samples per prompt at most
SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and the most likely alternatives at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One generated sequence.

    Attributes:
        text: the continuation (special tokens and the stop string removed).
        tokens: generated token ids (a final eos id included when generation stopped on it).
        finish_reason: "stop" (eos or a stop string), "length" (max_new_tokens or the context window), or
            "error" (the request's settings left nothing to generate; see ``error``).
        stop_reason: the stop string or eos id that ended it; with "length", "context" when the context window
            (prompt included) filled before max_new_tokens was reached, None when max_new_tokens was.
        prompt_tokens: the prompt's token ids.
        index: which prompt of the call it continues; sample: which of its n samples.
        seed: the seed its sampling used.
        logprobs: per token, when requested.
        settings: the reproducibility record: model, seed and every setting used.
        error: why generation failed, with finish_reason "error".
    """

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None
    index: int = 0
    sample: int = 0
    seed: int | None = None
    logprobs: list[TokenLogprob] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Chunk(str):
    """A piece of streamed text (a ``str``: join, print or compare it as text) carrying the token ids that
    produced it, the sample it belongs to (with n > 1 each chunk is one sample's), the finish and stop reasons on
    that sample's last piece (as ``GenerationResult``'s; ``error`` when it is "error"), and log-probabilities when
    requested."""

    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    sample: int
    error: str | None
    stop_reason: str | int | None

    def __new__(cls, text: str, token_ids: list[int], finish_reason: str | None = None,
                logprobs: list[TokenLogprob] | None = None, sample: int = 0, error: str | None = None,
                stop_reason: str | int | None = None) -> "Chunk":
        chunk = super().__new__(cls, text)
        chunk.token_ids, chunk.finish_reason, chunk.logprobs = token_ids, finish_reason, logprobs
        chunk.sample, chunk.error, chunk.stop_reason = sample, error, stop_reason
        return chunk

    @property
    def text(self) -> str:
        """The piece as a plain ``str``."""
        return str.__str__(self)


@dataclass
class LanguageModel:
    """A model ready to generate: what ``prosa.load`` returns.

    Attributes:
        model: the network, ``model(input_ids, cache, attention_mask) -> logits``.
        tokenizer: its ``prosa.tokenizer.Tokenizer``.
        config: the Hugging Face config dict (from config.json or GGUF metadata).
        generation_config: generation defaults (generation_config.json), possibly empty.
        name: what it was loaded from (path or Hub id).
        quantize: the weight format it runs in: "none" (float, see ``dtype``), "bf16", "int8" or "int4".
        weights: how the layers are stored, e.g. "210 x int4 (GGUF Q4_1, exact), 1 x int8 (GGUF Q8_0, exact)".
        threads: CPU threads the engine thread's kernels use (None: PyTorch's default).
        engine_options: settings of ``engine`` (see ``prosa.engine.Engine``), read when it starts.

    Thread-safe: ``generate``, ``stream`` and ``events`` may be called from many threads at once; their requests
    are decoded together by ``engine``, each getting exactly the tokens it would get alone.
    """

    model: torch.nn.Module
    tokenizer: "Tokenizer"
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    path: Path | None = None
    quantize: str = "none"
    weights: str = ""
    threads: int | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    _engine: Engine | None = field(default=None, init=False, repr=False, compare=False)
    _engine_lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def engine(self) -> Engine:
        """The decode loop every generation of this model runs in (started on first use; ``engine_options``
        are its settings: max_batch, kv_cache_tokens, prefill_chunk, block_size, prefix_cache)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = Engine(self.model, self.tokenizer, threads=self.threads, **self.engine_options)
        return self._engine

    @property
    def context_length(self) -> int:
        """Tokens the model can attend to (prompt + continuation)."""
        return self.model.context_length

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        """Distinct parameters (a tied output layer counts once)."""
        return sum({p.data_ptr(): p.numel() for p in self.model.parameters()}.values())

    # -- requests ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (a list of ids passes through, checked).

        Raises:
            ValueError: the prompt is empty (no text and no ids) or holds ids outside the vocabulary.
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            vocab = self.vocab_size
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
                    raise ValueError(f"prompt: token ids must be integers in [0, {vocab}), got {t!r}")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("prompt is empty: give some text (or token ids) to continue")
        return ids

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: its config's ``vocab_size`` (else the tokenizer's)."""
        return int(self.config.get("vocab_size") or self.tokenizer.vocab_size)

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling settings a call that sets none gets: the model's generation_config (transformers' reading:
        greedy unless ``do_sample``), else prosa's defaults (``prosa.defaults.resolve``)."""
        return {k: v for k, v in resolve(self.generation_config, {}).items() if k in SAMPLING_FIELDS}

    def bad_words_ids(self, words: Iterable[str]) -> tuple[tuple[int, ...], ...]:
        """Token sequences for banned words: each word alone and after a space (how it appears mid-text)."""
        out: dict[tuple[int, ...], None] = {}
        for w in words:
            for variant in (w, " " + w.lstrip()):
                ids = tuple(self.tokenizer.encode(variant, add_special_tokens=False))
                if ids:
                    out[ids] = None
        return tuple(out)

    def make_requests(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int | None = None,
                      max_length: int | None = None, stop: str | Sequence[str] | None = None, n: int = 1, seed: int | None = None,
                      logprobs: int | None = None, context_overflow: str = "error", ignore_eos: bool = False,
                      bad_words: Sequence[str] | None = None, **sampling: Any) -> list[Request]:
        """Validate settings and build one ``Request`` per prompt (see ``generate`` for the arguments).

        Raises:
            ValueError: a bad parameter (the message names it), max_new_tokens or max_length beyond the context
                window, or a prompt that leaves no room: it fills the window (``context_overflow="error"``) or
                max_length (without max_new_tokens). With several prompts the message starts "prompt i:".
        """
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
        if max_new_tokens is None and max_length is None:
            max_new_tokens = resolve(self.generation_config, {})["max_new_tokens"]
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 0):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise ValueError(f"n (num_return_sequences) must be an integer from 1 to {MAX_N}, got {n!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r}")
        if context_overflow not in OVERFLOW_MODES:
            raise ValueError(f"context_overflow must be one of {', '.join(OVERFLOW_MODES)}, got {context_overflow!r}")
        window, slide = self.context_length, context_overflow == "slide"
        # Asking for more than the window can ever hold is a mistake, refused before any work; asking for more
        # than the window leaves after this prompt is not: the engine stops there with stop_reason "context".
        name, value = ("max_new_tokens", max_new_tokens) if max_new_tokens is not None else ("max_length", max_length)
        if value is not None and value > window and not slide:
            raise ValueError(f"{name} is {value} but the context window is {window} tokens, prompt included; ask "
                             "for fewer, or let generation slide past the window (context_overflow='slide', "
                             "--context-overflow slide)")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        # the caller's settings, else the model's generation_config, else prosa's defaults: the one resolver
        settings = {k: v for k, v in resolve(self.generation_config, sampling).items() if k in SAMPLING_FIELDS}
        if bad_words:
            settings["bad_words_ids"] = tuple(settings.get("bad_words_ids", ())) + self.bad_words_ids(bad_words)
        if settings.get("logit_bias"):
            settings["logit_bias"] = {int(k): float(v) for k, v in settings["logit_bias"].items()}
        params = SamplingParams(**settings).validate(self.tokenizer.vocab_size)
        requests = []
        for i, p in enumerate(prompts):
            try:
                ids = self.encode(p)
                if len(ids) >= window:
                    if not slide:
                        raise ValueError(f"the prompt is {len(ids)} tokens and the context window is {window}, "
                                         "prompt included, so no new token fits; shorten it, or keep only its most "
                                         "recent tokens (context_overflow='slide', --context-overflow slide)")
                    ids = ids[-(window - 1):]
                # max_length counts the prompt too (transformers' meaning); max_new_tokens wins when both are given.
                if max_new_tokens is None and len(ids) >= max_length:
                    # transformers raises too: an empty continuation would pass for a finished one
                    raise ValueError(f"the prompt is {len(ids)} tokens but max_length is {max_length}, prompt "
                                     "included, so nothing can be generated; raise max_length or, better, set "
                                     "max_new_tokens")
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
            new = max_new_tokens if max_new_tokens is not None else max_length - len(ids)
            requests.append(Request(ids, params, new, stops, n, seed, logprobs, ignore_eos, context_overflow))
        return requests

    def room(self, request: Request) -> int:
        """Tokens ``request`` can generate at most: its max_new_tokens, or fewer when the context window (prompt
        included) fills first; the engine then ends it with finish_reason "length", stop_reason "context"."""
        if request.context_overflow == "slide":
            return request.max_new_tokens
        return max(0, min(request.max_new_tokens, self.context_length - len(request.prompt)))

    def settings(self, req: Request, sample: int, context_overflow: str) -> dict[str, Any]:
        """The reproducibility record of one sequence."""
        from . import __version__

        p = req.params
        return {"model": self.name, "prosa_version": __version__, "dtype": str(self.dtype).replace("torch.", ""),
                "quantize": self.quantize,
                "seed": req.seed + sample, "max_new_tokens": req.max_new_tokens, "stop": list(req.stop),
                "n": req.n, "logprobs": req.logprobs, "context_overflow": context_overflow,
                "ignore_eos": req.ignore_eos,
                **{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in
                   ((f, getattr(p, f)) for f in SAMPLING_FIELDS)}}

    # -- generation -------------------------------------------------------------------------------------
    def events(self, prompts: Sequence[str | Sequence[int]], **kwargs: Any) -> tuple[list[Request], Iterator[Event]]:
        """Lowest-level API: the requests and the iterator of per-token ``Event``s (see ``prosa.engine``).

        The requests are checked now (ValueError naming the bad setting) and submitted to the engine when the
        iterator starts; closing it early cancels them.
        """
        requests = self.make_requests(prompts, **kwargs)
        for r in requests:
            self.engine.check(r)
        return requests, self.run(requests)

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Submit ``requests`` to the engine and yield their events as they come (``Event.seq`` numbers the
        sequences request-major); closing the iterator, or an exception in the caller, cancels what is left."""
        events: "queue.SimpleQueue[Event]" = queue.SimpleQueue()
        offsets = [0]
        for r in requests:
            offsets.append(offsets[-1] + r.n)
        left = offsets[-1]
        handles = []
        try:
            for tag, r in enumerate(requests):
                handles.append(self.engine.submit(r, tag=tag, events=events))
            while left:
                ev = events.get()
                ev.seq = offsets[ev.request] + ev.sample
                if ev.finish_reason is not None:
                    left -= 1
                yield ev
        finally:
            if left:
                for h in handles:
                    h.cancel()

    def generate(self, prompt: str | Sequence[int] | Sequence[str], **kwargs: Any
                 ) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt, or a batch of prompts decoded together.

        Args:
            prompt: a string (or token ids), or a list of strings (or of token-id lists).
            max_new_tokens: tokens to generate at most (default: generation_config's, else 128); more than the
                context window only with context_overflow="slide". More than the window leaves after the prompt
                is allowed: the sequence ends at the window with finish_reason "length", stop_reason "context".
            max_length: prompt + generated tokens at most (transformers' meaning); max_new_tokens wins. A prompt
                of max_length tokens or more raises ValueError, as in transformers (nothing could be generated).
            temperature: 0 = greedy (default: the model's generation_config; greedy if it says nothing).
            top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty,
            no_repeat_ngram_size, logit_bias ({token id: bias}), bad_words (strings), bad_words_ids,
            min_new_tokens: sampling controls, see ``prosa.sampling.SamplingParams``.
            stop: a string or strings that end generation (never included in the text).
            n: samples per prompt (at most 128); the prompt is run through the model once.
            seed: sample j of every prompt uses ``seed + j`` (random when None; recorded in ``settings``).
            logprobs: None, or k in 0..20: the chosen token's log-probability and the k most likely alternatives.
            context_overflow: "error" (stop at the window; a prompt that fills it raises ValueError) or
                "slide" (drop the oldest tokens and go on).
            ignore_eos: do not stop at eos.
        Returns:
            for a string prompt: a ``GenerationResult``, or a list of n of them when n > 1;
            for a list of prompts: a flat list, prompt-major (all samples of prompt 0, then prompt 1, ...).
        Raises:
            ValueError: a bad setting or prompt (empty, ids outside the vocabulary, filling the window or
                max_length); with several prompts the message starts "prompt i:".
        """
        single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], int))
        prompts = [prompt] if single else list(prompt)
        overflow = kwargs.get("context_overflow", "error")
        requests, events = self.events(prompts, **kwargs)
        results: dict[int, GenerationResult] = {}
        pieces: dict[int, list[str]] = {}
        for ev in events:
            res = results.get(ev.seq)
            if res is None:
                req = requests[ev.request]
                res = results[ev.seq] = GenerationResult(
                    "", [], "length", list(req.prompt), index=ev.request, sample=ev.sample,
                    seed=req.seed + ev.sample, logprobs=[] if req.logprobs is not None else None,
                    settings=self.settings(req, ev.sample, overflow))
                pieces[ev.seq] = []
            if ev.token >= 0:
                res.tokens.append(ev.token)
                if res.logprobs is not None:
                    res.logprobs.append(TokenLogprob(ev.token, ev.logprob, ev.top_logprobs or []))
            pieces[ev.seq].append(ev.text)
            if ev.finish_reason:
                res.finish_reason, res.stop_reason, res.error = ev.finish_reason, ev.stop_reason, ev.error
        out = []
        for seq in sorted(results):
            results[seq].text = "".join(pieces[seq])
            out.append(results[seq])
        if single:
            return out[0] if len(out) == 1 else out
        return out

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[Chunk]:
        """Yield the continuation of one prompt as ``Chunk``s of text (with their token ids) as they are generated;
        joined, a sample's texts equal ``generate(...).text`` for the same settings. With n > 1, each chunk is one
        sample's (``Chunk.sample``). Closing the iterator cancels the generation. Arguments as ``generate``."""
        requests, events = self.events([prompt], **kwargs)      # settings checked now, not at the first chunk
        return self._chunks(events, requests[0].logprobs is not None)

    @staticmethod
    def _chunks(events: Iterator[Event], want_logprobs: bool) -> Iterator[Chunk]:
        pending: dict[int, list[int]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        try:
            for ev in events:
                toks, lps = pending.setdefault(ev.sample, []), logprobs.setdefault(ev.sample, [])
                if ev.token >= 0:
                    toks.append(ev.token)
                    if ev.logprob is not None:
                        lps.append(TokenLogprob(ev.token, ev.logprob, ev.top_logprobs or []))
                if ev.text or ev.finish_reason:
                    yield Chunk(ev.text, toks, ev.finish_reason, lps if want_logprobs else None, ev.sample, ev.error,
                                ev.stop_reason)
                    pending[ev.sample], logprobs[ev.sample] = [], []
        finally:
            events.close()
