"""Generation, as generators all the way down.

``stream_generate`` runs a batch of ``Request``s through the model and yields an ``Event`` per generated token
of every sequence: prefill (each distinct prompt once, its cache then shared by its ``n`` samples), logits
processors and per-sequence samplers (``prosa.sampling``), streaming detokenization, stop strings held back until
they can no longer match, eos/length stopping, finished sequences dropped from the batch, and sliding past the
context window. ``LanguageModel.generate``/``stream`` turn events into results and text pieces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from .decode import decode_step
from .sampling import SamplingParams, TokenHistory, apply, make_generators, make_logits_processors, make_sampler

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

OVERFLOW_MODES = ("error", "slide")


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
    """

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class Event:
    """One generated token of one sequence.

    Attributes:
        seq: sequence number, request-major (request r's sample j comes after all samples of requests < r).
        request, sample: which request and which of its n samples.
        token: the token id.
        text: text this token made final (may be empty: held back for a multi-byte character or a possible
            stop string; on the last event, whatever was held).
        logprob, top_logprobs: when requested: log-probability of ``token`` and the most likely (id, logprob)
            pairs, under the model's own distribution (before temperature and filters).
        finish_reason: "stop" or "length" on the sequence's last event, else None.
        stop_reason: the stop string or eos id that ended it.
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


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
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


class PromptCache:
    """A KV cache kept between calls for one conversation: the next call with a prompt that extends the cached
    tokens only runs the new ones through the model (``prosa.Chat`` uses it)."""

    def __init__(self):
        self.cache = None
        self.tokens: list[int] = []   # tokens whose keys/values the cache holds

    def reset(self) -> None:
        self.cache, self.tokens = None, []


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of different lengths -> (input_ids (B, T), attention_mask (B, T) or None), padded on the left so
    that every sequence's next token is the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def prefill(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int = 0,
            prompt_cache: PromptCache | None = None):
    """Run prompts through the model; return (cache, next-token logits (B, V) float32).

    With ``prompt_cache`` (one prompt), only the part of the prompt after the longest cached prefix is run.
    """
    device = next(model.parameters()).device
    if prompt_cache is not None:
        (prompt,) = prompts
        same = 0
        for a, b in zip(prompt_cache.tokens, prompt):
            if a != b:
                break
            same += 1
        same = min(same, len(prompt) - 1)    # at least one token must run to get logits
        cache = prompt_cache.cache
        if cache is None or same == 0:
            cache, same = model.make_cache(1), 0
        else:
            cache.truncate(same)
        ids = torch.tensor([prompt[same:]], dtype=torch.long, device=device)
        prompt_cache.cache, prompt_cache.tokens = cache, list(prompt)
        return cache, model(ids, cache)[:, -1].float()
    ids, mask = left_pad(prompts, pad_id, device)
    cache = model.make_cache(len(prompts))
    return cache, model(ids, cache, mask)[:, -1].float()


@dataclass
class _Seq:
    """Book-keeping of one live sequence."""

    seq: int
    request: int
    sample: int
    req: Request
    tokens: list[int]          # prompt + generated (what the model has seen or will see next)
    detok: Any
    stop: StopMatcher
    limit: int
    generated: int = 0


@torch.inference_mode()
def stream_generate(model: nn.Module, tokenizer: "Tokenizer", requests: Sequence[Request], *,
                    context_overflow: str = "error", prompt_cache: PromptCache | None = None) -> Iterator[Event]:
    """Decode a batch of requests, yielding an ``Event`` per token of every sequence.

    Args:
        model: ``model(input_ids, cache, attention_mask) -> logits``, with ``make_cache`` and ``context_length``.
        tokenizer: for the streaming detokenizers and eos ids.
        requests: prompts (each already within the window unless ``context_overflow="slide"``).
        context_overflow: "error": a sequence stops ("length") when prompt + output fill the window;
            "slide": the oldest tokens are dropped (the window restarts from its most recent half) and
            generation goes on.
        prompt_cache: reuse and update this cache (a single request with n == 1).
    """
    if context_overflow not in OVERFLOW_MODES:
        raise ValueError(f"context_overflow must be one of {OVERFLOW_MODES}, got {context_overflow!r}")
    if prompt_cache is not None and (len(requests) != 1 or requests[0].n != 1 or context_overflow != "error"):
        raise ValueError("prompt_cache needs a single request with n=1 and context_overflow='error'")
    window = model.context_length
    eos = frozenset(tokenizer.eos_token_ids)
    seqs: list[_Seq] = []
    for r, req in enumerate(requests):
        room = window - len(req.prompt)
        limit = req.max_new_tokens if context_overflow == "slide" else min(req.max_new_tokens, max(room, 0))
        for j in range(req.n):
            seqs.append(_Seq(len(seqs), r, j, req, list(req.prompt), tokenizer.detokenizer(),
                             StopMatcher(req.stop), limit))
    for s in seqs:
        if s.limit <= 0:
            yield Event(s.seq, s.request, s.sample, -1, "", finish_reason="length")
    live = [s for s in seqs if s.limit > 0]
    if not live:
        return
    # Prefill each distinct request once; its n samples share the resulting cache rows.
    active = sorted({s.request for s in live})
    cache, logits = prefill(model, [requests[r].prompt for r in active], tokenizer.pad_token_id or 0, prompt_cache)
    row_of = {r: i for i, r in enumerate(active)}
    index = torch.tensor([row_of[s.request] for s in live], dtype=torch.long)
    if len(index) != len(active) or bool((index != torch.arange(len(active))).any()):
        cache.select(index.to(logits.device))
        logits = logits[index.to(logits.device)]

    vocab = logits.shape[-1]
    history = TokenHistory([s.tokens for s in live], vocab, logits.device)
    generators = make_generators([s.req.seed + s.sample for s in live])

    def build(batch: list[_Seq]):
        params = [s.req.params for s in batch]
        return make_logits_processors(params, eos, vocab, logits.device), make_sampler(params)

    processors, sampler = build(live)
    step = decode_step(model)           # the model itself, or a fused equivalent (prosa.decode)
    want_logprobs = any(s.req.logprobs is not None for s in live)
    while True:
        raw = logits
        # Processors return new tensors (never modify their input), so `raw` stays the model's own logits.
        tokens = sampler(apply(processors, raw, history), generators)                  # (B,)
        history.append(tokens)
        if want_logprobs:
            lp = torch.log_softmax(raw, dim=-1)
            chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
            k = max(s.req.logprobs or 0 for s in live)
            top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        keep: list[int] = []
        for i, (s, tok) in enumerate(zip(live, tokens.tolist())):
            s.generated += 1
            s.tokens.append(tok)
            text, stop = s.stop.feed(s.detok.add_token(tok))
            reason = stop_reason = None
            if stop is not None:
                reason, stop_reason = "stop", stop
            elif tok in eos and not s.req.ignore_eos:
                reason, stop_reason = "stop", tok
            elif s.generated >= s.limit:
                reason = "length"
            if reason and stop is None:
                tail, stop = s.stop.feed(s.detok.finalize())
                text += tail if stop is not None else tail + s.stop.flush()
                if stop is not None:
                    stop_reason = stop
            ev = Event(s.seq, s.request, s.sample, tok, text, finish_reason=reason, stop_reason=stop_reason)
            if want_logprobs and s.req.logprobs is not None:
                ev.logprob = chosen[i]
                n = s.req.logprobs
                ev.top_logprobs = list(zip(top_i[i, :n].tolist(), top_v[i, :n].tolist())) if n else []
            yield ev
            if reason is None:
                keep.append(i)
        if not keep:
            return
        if len(keep) != len(live):
            index = torch.tensor(keep, dtype=torch.long, device=logits.device)
            cache.select(index)
            history.select(index)
            tokens = tokens[index]
            live = [live[i] for i in keep]
            generators = [generators[i] for i in keep]
            processors, sampler = build(live)
            want_logprobs = any(s.req.logprobs is not None for s in live)
        if context_overflow == "slide" and int(cache.lengths.max()) >= window:
            # Restart the window from each sequence's most recent tokens (positions are recomputed, which
            # models with learned absolute positions such as GPT-2 need).
            keep_n = max(1, window // 2)
            cache, logits = prefill(model, [s.tokens[-keep_n:] for s in live], tokenizer.pad_token_id or 0)
        else:
            logits = step(tokens[:, None], cache)[:, -1].float()
        if prompt_cache is not None:
            prompt_cache.tokens.append(live[0].tokens[-1])   # the token just run through the model
