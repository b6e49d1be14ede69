"""One step of the engine's loop, and the state it works on: the waiting queue, prompts being run, the batch.

``Scheduler.step`` admits waiting requests (FIFO; batch size and KV reservations), runs prompt pieces, picks a
token for every decoding row, emits the events and runs one decode step; ``end`` finishes a request early
(cancelled or failed). Only the engine thread calls it (``prosa.engine.engine`` owns the thread and the door).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from .batch import Picker
from .blocks import BlockPool
from .metrics import Metrics
from .runner import PagedRunner, SoloRunner
from .sequence import CONTEXT, Event, Request, Sequence

if TYPE_CHECKING:
    from .engine import Handle

log = logging.getLogger("prosa")


class Scheduler:
    """The queue, the prompts in progress and the decoding batch of one engine.

    Args:
        runner: runs the model (paged or solo); pool: its KV blocks (None for the solo runner).
        tokenizer: for detokenizers and end ids; window: the context window.
        max_batch, prefill_chunk: see ``Engine``; metrics: where the numbers go.
    """

    def __init__(self, runner: PagedRunner | SoloRunner, pool: BlockPool | None, tokenizer: Any, window: int,
                 max_batch: int, prefill_chunk: int, metrics: Metrics):
        self.runner, self.pool, self.tokenizer, self.window = runner, pool, tokenizer, window
        self.max_batch, self.prefill_chunk, self.metrics = max_batch, prefill_chunk, metrics
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.waiting: deque[Handle] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.live = 0                        # sequences admitted and not ended (incl. samples not forked yet)
        self._picker: Picker | None = None
        self._last: tuple[list[Sequence], torch.Tensor] | None = None   # rows of the last decode and their logits

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def in_flight(self) -> set[Handle]:
        return {*self.waiting, *(s.handle for s in (*self.prefilling, *self.running))}

    def blocks_for(self, request: Request) -> int:
        """KV blocks one sample of ``request`` may need at most (its reservation)."""
        if self.pool is None:
            return 0
        most = (self.window if request.context_overflow == "slide"
                else min(len(request.prompt) + request.max_new_tokens, self.window))
        return -(-most // self.pool.block_size) + 1       # + 1: a block copied when samples fork

    def step(self) -> None:
        """Admit, run prompt pieces, pick and emit, decode once."""
        self._admit()
        self._prefill()
        self._decode()
        for i, h in enumerate(self.waiting):
            h.position = i

    def reset(self) -> None:
        """Forget the batch's cached state (after a failed step)."""
        self._picker = self._last = None

    def _admit(self) -> None:
        admitted = False
        while self.waiting:
            h = self.waiting[0]
            req = h.request
            per_sample = self.blocks_for(req)
            if self.live and self.live + req.n > self.max_batch:
                break
            if self.pool is not None and self.pool.reserved + per_sample * req.n > self.pool.num_blocks:
                break
            self.waiting.popleft()
            h.position = None
            if self.pool is not None:
                self.pool.reserved += per_sample * req.n
            self.live += req.n
            limit = (req.max_new_tokens if req.context_overflow == "slide"
                     else min(req.max_new_tokens, self.window - len(req.prompt)))
            if limit <= 0 and req.prompt_logprobs is None:     # the prompt fills the window (or max_new_tokens 0)
                why = CONTEXT if limit < req.max_new_tokens else None
                for j in range(req.n):
                    self._finish(h, Event(j, h.tag, j, -1, "", finish_reason="length", stop_reason=why))
                continue
            leader = self._sequence(h, 0, list(req.prompt), limit)
            self.runner.start(leader, reuse=req.prompt_logprobs is None)
            self.metrics.add(prompt_tokens=len(req.prompt), prompt_tokens_cached=leader.cached)
            self.prefilling.append(leader)
            admitted = True
        if admitted:
            self.runner.refresh()

    def _sequence(self, h: Handle, sample: int, tokens: list[int], limit: int) -> Sequence:
        seq = Sequence(h, sample, tokens, limit, self.tokenizer.detokenizer(h.request.skip_special_tokens),
                       torch.Generator().manual_seed(h.request.seed + sample))
        h.seqs.append(seq)
        return seq

    def _prefill(self) -> None:
        # A prompt is cut at every prefill_chunk tokens of its own, whatever else runs (the cut changes rounding,
        # so it must not depend on the neighbours); a step takes whole pieces while they fit its budget.
        budget = self.prefill_chunk
        while self.prefilling:
            seq = self.prefilling[0]
            count = min(self.prefill_chunk, len(seq.pending))
            if count > budget:
                break
            every = seq.prompt_logprobs is not None and seq.generated == 0
            try:
                logits = self.runner.prefill(seq, count, every)
            except Exception as e:
                log.exception("prosa engine: prompt failed")
                self.end(seq.handle, "error", f"the prompt could not be run: {e}", internal=True)
                continue
            if every:
                logits = self._score_prompt(seq, logits)
            budget -= count
            self.metrics.add(prompt_tokens_computed=count)
            if seq.pending:
                continue
            self.prefilling.popleft()
            h = seq.handle
            if seq.limit <= 0:                                   # prompt log-probabilities only (max_tokens 0)
                for j in range(h.request.n):
                    self._finish(h, Event(j, h.tag, j, -1, "", finish_reason="length",
                                          stop_reason=CONTEXT if seq.limit < h.request.max_new_tokens else None,
                                          prompt_logprobs=seq.prompt_logprobs), seq if j == 0 else None)
                continue
            seq.logits = logits
            self.running.append(seq)
            if seq.generated == 0 and seq.sample == 0:           # a new prompt: its other samples fork from it
                for j in range(1, h.request.n):
                    follower = self._sequence(h, j, list(seq.tokens), seq.limit)
                    self.runner.fork(seq, follower)
                    follower.logits = logits
                    follower.prompt_logprobs = seq.prompt_logprobs
                    self.running.append(follower)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """Record the log-probability of each prompt token the chunk's logits (T, V) predict; return the last
        row (the next-token logits)."""
        k = seq.request.prompt_logprobs
        lp = torch.log_softmax(logits, dim=-1)
        start = seq.cached - logits.shape[0]                 # position of the chunk's first token
        rows = min(logits.shape[0], len(seq.tokens) - start - 1)   # row i predicts prompt token start + i + 1
        if rows > 0:
            nxt = torch.tensor(seq.tokens[start + 1:start + 1 + rows])
            chosen = lp[torch.arange(rows), nxt].tolist()
            tops = lp[:rows].topk(k, dim=-1) if k else None
            for i in range(rows):
                alts = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if k else []
                seq.prompt_logprobs.append((chosen[i], alts))
        return logits[-1]

    def _decode(self) -> None:
        rows = self.running
        if not rows:
            return
        if self._last is not None and self._last[0] == rows:
            logits = self._last[1]
        else:
            logits = torch.stack([s.logits for s in rows])
        tokens, dead, logprobs = self._pick(rows, logits)
        now = time.monotonic()
        keep: list[int] = []
        for i, s in enumerate(rows):
            if s.done:                   # ended with another sample of its request
                continue
            if i in dead:
                self._finish(s.handle, Event(s.sample, s.handle.tag, s.sample, -1, "", finish_reason="error",
                                             error=dead[i]), s)
                continue
            ev = self._advance(s, tokens[i], logprobs[i] if logprobs else None)
            self._record(s, now)
            if ev.finish_reason:
                self._finish(s.handle, ev, s)
            elif s.request.context_overflow == "slide" and s.cached >= self.window:
                self._slide(s)
                s.handle.queue.put(ev)
            else:
                s.handle.queue.put(ev)
                keep.append(i)
        keep = [i for i in keep if not rows[i].done]
        self.running = [rows[i] for i in keep]
        self._last = None
        if not keep:
            return
        new = torch.tensor([tokens[i] for i in keep], dtype=torch.long)
        try:
            out = self.runner.decode(self.running, new)
        except Exception as e:
            log.exception("prosa engine: decode step failed")
            for h in {s.handle for s in self.running}:
                self.end(h, "error", f"the decode step failed: {e}", internal=True)
            return
        self._last = (list(self.running), out)
        for i, s in enumerate(self.running):
            s.logits = out[i]

    def _pick(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[list[int], dict[int, str], list | None]:
        """Tokens for ``rows``; when the batch's processors fail (a bad setting the door did not catch), each row
        is picked alone so that only the rows at fault fail."""
        try:
            if self._picker is None or self._picker.rows != rows:
                self._picker = Picker(rows, logits.shape[-1], self.eos_ids, logits.device)
            return self._picker.pick(logits)
        except Exception:
            self._picker = None
        tokens, dead, logprobs = [], {}, []
        for i, s in enumerate(rows):
            try:
                (tok,), d, lp = Picker([s], logits.shape[-1], self.eos_ids, logits.device).pick(logits[i:i + 1])
            except Exception as e:
                tok, d, lp = -1, {0: f"this request's settings failed: {e}"}, None
            tokens.append(tok)
            if d:
                dead[i] = d[0]
            logprobs.append(lp[0] if lp else None)
        return tokens, dead, logprobs if any(lp is not None for lp in logprobs) else None

    def _advance(self, s: Sequence, tok: int, logprob: tuple | None) -> Event:
        """Append ``tok`` to ``s``; the event with its text and, when it ends ``s``, the finish reason."""
        h, req = s.handle, s.request
        s.generated += 1
        s.tokens.append(tok)
        text, stop = s.stop.feed(s.detok.add_token(tok))
        reason = stop_reason = None
        if stop is not None:
            reason, stop_reason = "stop", stop
        elif tok in (req.eos_ids if req.eos_ids is not None else self.eos_ids) and not req.ignore_eos:
            reason, stop_reason = "stop", tok
        elif s.generated >= s.limit:
            # The limit is max_new_tokens, or less when the window (prompt included) fills first: say which.
            reason, stop_reason = "length", CONTEXT if s.limit < req.max_new_tokens else None
        if reason and stop is None:
            # An unfinished last character (the limit cut an emoji after its first byte) is dropped, not U+FFFD.
            tail, stop = s.stop.feed(s.detok.finalize(drop_incomplete=True))
            text += tail if stop is not None else tail + s.stop.flush()
            if stop is not None:
                stop_reason = stop
        ev = Event(s.sample, h.tag, s.sample, tok, text, finish_reason=reason, stop_reason=stop_reason,
                   prompt_logprobs=s.prompt_logprobs if s.generated == 1 else None)
        if logprob is not None:
            ev.logprob, ev.top_logprobs = logprob
        return ev

    def _record(self, s: Sequence, now: float) -> None:
        m, h = self.metrics, s.handle
        m.add(generation_tokens=1)
        if h.first_token is None:
            h.first_token = now
            m.observe("ttft", now - h.submitted)
        elif s.last_token_time is not None:
            m.observe("itl", now - s.last_token_time)
        s.last_token_time = now

    def _slide(self, s: Sequence) -> None:
        """Restart ``s``'s window from its most recent half (positions are recomputed, which models with learned
        absolute positions such as GPT-2 need); it rejoins the batch once that is prefilled, ahead of new prompts."""
        self.runner.release(s)
        s.offset = len(s.tokens) - max(1, self.window // 2)
        self.runner.start(s)
        s.logits = None
        self.prefilling.appendleft(s)

    def _finish(self, h: Handle, ev: Event, s: Sequence | None = None) -> None:
        """End one sample of ``h`` with its last event (``s``: its sequence, if it started)."""
        if s is not None:
            s.done = True
            self.runner.release(s)
            s.logits = s.matcher = s.cache = None    # a logits row keeps its whole batch's tensor alive
        if h.position is None:           # admitted: give back its share of the reservation and the batch
            if self.pool is not None:
                self.pool.reserved -= self.blocks_for(h.request)
            self.live -= 1
        h.finished += 1
        if h.done:
            h.seqs = []                              # no Handle <-> Sequence cycle left for the GC to find
        self.metrics.finished(ev.finish_reason)
        h.queue.put(ev)

    def end(self, h: Handle, reason: str, error: str | None = None, internal: bool = False) -> None:
        """End every unfinished sample of ``h`` (cancelled, or failed with ``error``; ``internal``: the engine's own
        failure, see ``Event.internal``)."""
        if h.done:
            return
        if h.position is not None and h in self.waiting:
            self.waiting.remove(h)
        self.prefilling = deque(s for s in self.prefilling if s.handle is not h)
        self.running = [s for s in self.running if s.handle is not h]
        started = {s.sample: s for s in h.seqs}
        for j in range(h.request.n):
            s = started.get(j)
            if s is None or not s.done:
                self._finish(h, Event(j, h.tag, j, -1, "", finish_reason=reason, error=error, internal=internal), s)
