"""The engine: one thread owns the model and runs one decode loop; requests join and leave it at any step.

Callers (``LanguageModel.generate``/``stream``, the pipeline, chat, the server) ``submit`` a ``Request`` from any
thread and read ``Event``s from a queue. The engine thread, each step:

1. takes in new requests and cancellations;
2. admits waiting requests in order (FIFO) while the batch has room (``max_batch`` sequences) and the KV budget
   can hold everything they may ever need (their reservation: prompt + max_new_tokens, or the window when
   sliding), so that a running sequence never waits for memory;
3. runs at most ``prefill_chunk`` prompt tokens (one request's prompt in pieces, or several short ones, each
   sequence in its own forward); a prompt whose prefix is in the prefix cache runs only the rest; when a prompt
   is done its ``n`` samples fork from it and join the batch;
4. picks the next token of every decoding sequence (``Picker``), emits the events, lets finished ones go (their
   blocks are released, nothing else moves) and slides the window of those that reached it;
5. runs one decode step for the rest.

A running stream therefore waits at most one prompt chunk per token. Every row is computed the same way
whatever else is in the batch (own positions, own keys, own generator), so a request gets the tokens it would
get alone; failures and cancellations end only the request concerned.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from typing import Any, Iterator

import torch

from .batch import Picker
from .blocks import BlockPool
from .metrics import Metrics
from .runner import PagedRunner, SoloRunner
from .sequence import Event, Request, Sequence

log = logging.getLogger("prosa")
IDLE_EXIT_S = 2.0            # the thread ends after this long with nothing to do (it restarts on the next request)
_ids = itertools.count(1)
_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


class Handle:
    """A submitted request. Its events arrive on ``queue``; ``cancel()`` ends it at the engine's next step.

    Attributes:
        request: what was asked; tag: the caller's number for it (``Event.request``).
        position: place in the waiting queue (0 = next to start), None once admitted (the engine sets it).
        finished: samples that have ended.
    """

    def __init__(self, engine: "Engine", request: Request, tag: int, events: "queue.SimpleQueue[Event]"):
        self.engine, self.request, self.tag, self.queue = engine, request, tag, events
        self.id = next(_ids)
        self.position: int | None = None
        self.finished = 0
        self.submitted = time.monotonic()
        self.first_token: float | None = None
        self.seqs: list[Sequence] = []       # samples started so far
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.finished >= self.request.n

    def cancel(self) -> None:
        """Stop generating (from any thread); unfinished samples end with finish_reason "cancelled"."""
        self.engine._cancel(self)

    def __iter__(self) -> Iterator[Event]:
        """The events of this request until every sample has ended (for a handle with its own queue)."""
        left = self.request.n
        while left:
            ev = self.queue.get()
            left -= ev.finish_reason is not None
            yield ev


def default_max_batch(device: torch.device) -> int:
    """Sequences decoded together by default: CPUs gain little past ~8 per physical core; GPUs take many."""
    if device.type != "cpu":
        return 128
    return max(8, min(64, 8 * max(1, (os.cpu_count() or 2) // 2)))


def default_kv_tokens(bytes_per_token: int, window: int, max_batch: int, block_size: int) -> int:
    """The default KV budget in tokens: a full batch of sequences each reserving the whole window (see
    ``Engine.blocks_for``), but at most a quarter of the available memory (and at least one such sequence)."""
    from ..loader import available_memory

    per_sequence = (-(-window // block_size) + 1) * block_size
    avail = available_memory() or 8 << 30
    return max(per_sequence, min(max_batch * per_sequence, avail // 4 // max(1, bytes_per_token)))


class Engine:
    """The decode loop of one model.

    Args:
        model: ``model(ids, cache) -> logits`` with ``context_length``; prosa's models (``kv_shape``) run on the
            paged cache, any other on per-sequence caches (``SoloRunner``).
        tokenizer: for detokenizers and end ids.
        max_batch: sequences decoded together at most (default ``default_max_batch``).
        kv_cache_tokens: the KV budget in tokens (default ``default_kv_tokens``); includes the prefix cache.
        prefill_chunk: prompt tokens run per step at most (the most a prompt delays running streams).
        block_size: tokens per KV block.
        prefix_cache: reuse the keys/values of earlier prompts' prefixes.
        threads: CPU threads of the engine thread's kernels (None: PyTorch's default).
        background: run the loop in the engine's own thread (False: the caller drives it with ``step``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int | None = None,
                 kv_cache_tokens: int | None = None, prefill_chunk: int = 256, block_size: int = 16,
                 prefix_cache: bool = True, threads: int | None = None, background: bool = True):
        for name, value in (("max_batch", max_batch), ("kv_cache_tokens", kv_cache_tokens), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("prefill_chunk", prefill_chunk), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.tokenizer = model, tokenizer
        self.window = model.context_length
        self.device = next(model.parameters()).device
        self.max_batch = max_batch or default_max_batch(self.device)
        self.prefill_chunk, self.threads = prefill_chunk, threads
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.metrics = Metrics(self._gauges)
        if hasattr(model, "kv_shape"):
            from .. import quant

            layers, heads, dim = model.kv_shape
            dtype = next(model.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            per_token = 2 * layers * heads * dim * torch.empty(0, dtype=dtype).element_size()
            tokens = kv_cache_tokens or default_kv_tokens(per_token, self.window, self.max_batch, block_size)
            self.pool: BlockPool | None = BlockPool(layers, heads, dim, dtype, self.device, block_size,
                                                    -(-tokens // block_size), prefix_cache)
            self.runner: PagedRunner | SoloRunner = PagedRunner(model, self.pool, quant.kernels())
        else:
            self.pool, self.runner = None, SoloRunner(model)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[Handle] = deque()
        self._cancels: set[Handle] = set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._clear = False
        self._background = background
        # Owned by the engine thread:
        self.waiting: deque[Handle] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._live = 0                       # sequences admitted and not ended (incl. samples not forked yet)
        self._picker: Picker | None = None
        self._last: tuple[list[Sequence], torch.Tensor] | None = None   # rows of the last decode and their logits
        _engines.add(self)

    # -- any thread ------------------------------------------------------------------------------------------------
    def blocks_for(self, request: Request) -> int:
        """KV blocks one sample of ``request`` may need at most (its reservation)."""
        if self.pool is None:
            return 0
        most = (self.window if request.context_overflow == "slide"
                else min(len(request.prompt) + request.max_new_tokens, self.window))
        return -(-most // self.pool.block_size) + 1       # + 1: a block copied when samples fork

    def submit(self, request: Request, *, tag: int = 0, events: "queue.SimpleQueue[Event] | None" = None) -> Handle:
        """Queue ``request``; returns its ``Handle`` (events on ``events``, or a new queue).

        Raises:
            ValueError: the request can never fit the KV budget.
            RuntimeError: the engine was closed.
        """
        if self.pool is not None:
            need = self.blocks_for(request) * request.n
            if need > self.pool.num_blocks:
                bs = self.pool.block_size
                raise ValueError(f"the request needs up to {need * bs} tokens of KV cache (n={request.n} x prompt + "
                                 f"max_new_tokens) but the engine's budget is {self.pool.num_blocks * bs}; lower "
                                 "max_new_tokens or n, or give the engine a larger kv_cache_tokens")
        handle = Handle(self, request, tag, events if events is not None else queue.SimpleQueue())
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            handle.position = len(self.waiting) + len(self._inbox)
            self._inbox.append(handle)
            self._start()
            self._wake.notify()
        return handle

    def _start(self) -> None:
        """Start the engine thread if it is not running (called with the lock held)."""
        if self._thread is None and self._background:
            self._thread = threading.Thread(target=self._loop, name="prosa-engine", daemon=True)
            self._thread.start()

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            if not handle.done:
                self._cancels.add(handle)
                self._wake.notify()

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt prefix at the next step (e.g. after the model's weights changed)."""
        with self._lock:
            self._clear = True
            self._start()
            self._wake.notify()
        if not self._background:
            self._iterate()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread after the current step; requests still in flight end with "cancelled"."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one iteration of the loop in the calling thread (an engine made with ``background=False``; tests
        use it to place requests at exact steps). Returns whether work is left."""
        if self._background:
            raise RuntimeError("this engine runs its own thread; step() is for background=False")
        with torch.inference_mode():
            self._iterate()
        return self._busy() or bool(self._inbox)

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)     # this thread's kernels only
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._inbox or self._cancels or self._closed or self._clear or self._busy()):
                        if not self._wake.wait(IDLE_EXIT_S) and not (self._inbox or self._cancels or self._clear
                                                                     or self._busy()):
                            self._thread = None
                            return
                if not self._iterate():
                    return

    def _iterate(self) -> bool:
        """Take in requests and cancellations, then one step; False once the engine is closed."""
        with self._lock:
            inbox, self._inbox = list(self._inbox), deque()
            cancels, self._cancels = self._cancels, set()
            closed, clear, self._clear = self._closed, self._clear, False
        if clear and self.pool is not None:
            self.pool.clear_prefixes()
        self.waiting.extend(inbox)
        for h in cancels:
            self._end(h, "cancelled")
        if closed:
            for h in self._in_flight():
                self._end(h, "cancelled")
            with self._lock:
                self._thread = None
            return False
        try:
            self._step()
        except Exception as e:     # a bug: end everything in flight rather than hang its callers
            log.exception("prosa engine step failed")
            for h in self._in_flight():
                self._end(h, "error", f"internal error: {e}")
            self._picker = self._last = None
        return True

    def _in_flight(self) -> set[Handle]:
        return {*self.waiting, *(s.handle for s in (*self.prefilling, *self.running))}

    def _busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _step(self) -> None:
        self._admit()
        self._prefill()
        self._decode()
        for i, h in enumerate(self.waiting):
            h.position = i

    def _gauges(self) -> dict[str, float]:
        """The live gauges (read from any thread: plain reads of the engine thread's counters)."""
        return {"waiting": len(self.waiting) + len(self._inbox), "running": self._live,
                "kv_cache_usage": self.pool.used / self.pool.num_blocks if self.pool is not None else 0.0}

    def _admit(self) -> None:
        admitted = False
        while self.waiting:
            h = self.waiting[0]
            req = h.request
            per_sample = self.blocks_for(req)
            if self._live and self._live + req.n > self.max_batch:
                break
            if self.pool is not None and self.pool.reserved + per_sample * req.n > self.pool.num_blocks:
                break
            self.waiting.popleft()
            h.position = None
            if self.pool is not None:
                self.pool.reserved += per_sample * req.n
            self._live += req.n
            limit = (req.max_new_tokens if req.context_overflow == "slide"
                     else min(req.max_new_tokens, self.window - len(req.prompt)))
            if limit <= 0:
                for j in range(req.n):
                    self._finish(h, Event(0, h.tag, j, -1, "", finish_reason="length"))
                continue
            leader = self._sequence(h, 0, list(req.prompt), limit)
            self.runner.start(leader)
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
            try:
                logits = self.runner.prefill(seq, count)
            except Exception as e:
                log.exception("prosa engine: prompt failed")
                self._end(seq.handle, "error", f"the prompt could not be run: {e}")
                continue
            budget -= count
            self.metrics.add(prompt_tokens_computed=count)
            if seq.pending:
                continue
            self.prefilling.popleft()
            seq.logits = logits
            self.running.append(seq)
            h = seq.handle
            if seq.generated == 0 and seq.sample == 0:           # a new prompt: its other samples fork from it
                for j in range(1, h.request.n):
                    follower = self._sequence(h, j, list(seq.tokens), seq.limit)
                    self.runner.fork(seq, follower)
                    follower.logits = logits
                    self.running.append(follower)

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
                self._end(h, "error", f"the decode step failed: {e}")
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
            reason = "length"
        if reason and stop is None:
            tail, stop = s.stop.feed(s.detok.finalize())
            text += tail if stop is not None else tail + s.stop.flush()
            if stop is not None:
                stop_reason = stop
        ev = Event(s.sample, h.tag, s.sample, tok, text, finish_reason=reason, stop_reason=stop_reason)
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
        if h.position is None:           # admitted: give back its share of the reservation and the batch
            if self.pool is not None:
                self.pool.reserved -= self.blocks_for(h.request)
            self._live -= 1
        h.finished += 1
        self.metrics.finished(ev.finish_reason)
        h.queue.put(ev)

    def _end(self, h: Handle, reason: str, error: str | None = None) -> None:
        """End every unfinished sample of ``h`` (cancelled, or failed with ``error``)."""
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
                self._finish(h, Event(j, h.tag, j, -1, "", finish_reason=reason, error=error), s)


@atexit.register
def _close_all() -> None:
    for engine in list(_engines):
        engine.close(timeout=2.0)
