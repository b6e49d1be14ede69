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
5. runs one decode step for the rest;
6. shrinks the KV tensors if the demand fell (a long sequence ended, short ones followed: ``BlockPool.settle``)
   and gives the freed memory back to the system (``prosa.heap.trim``).

A running stream therefore waits at most one prompt chunk per token. Every row is computed the same way
whatever else is in the batch (own positions, own keys, own generator), so a request gets the tokens it would
get alone; failures and cancellations end only the request concerned.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from typing import Any, Iterator, Sequence as Seq

import torch

from .. import heap
from .blocks import BlockPool
from .metrics import Metrics
from .runner import PagedRunner, SoloRunner
from .scheduler import Scheduler
from .sequence import Event, Request, Sequence

log = logging.getLogger("prosa")
DEFAULT_PREFIX_CACHE_TOKENS = 8192   # at most; a few conversations' worth (~380 MB for SmolLM2-135M, 590 MB GPT-2)
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
    """Sequences decoded together by default: on a CPU throughput still grows up to ~32 sequences (prosa's
    kernels read each weight once per step for all of them), more on a GPU."""
    return 32 if device.type == "cpu" else 256


def default_kv_tokens(bytes_per_token: int, window: int, max_batch: int, block_size: int) -> int:
    """The default KV budget in tokens: a full batch of sequences each reserving the whole window (see
    ``Scheduler.blocks_for``), but at most a quarter of the available memory (and at least one such sequence)."""
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
        prefix_cache_tokens: the most tokens of finished sequences kept for that (default
            ``DEFAULT_PREFIX_CACHE_TOKENS``), in the room running sequences leave: the KV memory follows what
            they need (2-4x their peak since the last sequence ended, see ``BlockPool.settle``), not this.
        threads: CPU threads of the engine thread's kernels (None: PyTorch's default).
        background: run the loop in the engine's own thread (False: the caller drives it with ``step``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int | None = None,
                 kv_cache_tokens: int | None = None, prefill_chunk: int = 256, block_size: int = 16,
                 prefix_cache: bool = True, prefix_cache_tokens: int | None = None, threads: int | None = None,
                 background: bool = True):
        if prefix_cache_tokens is not None and (isinstance(prefix_cache_tokens, bool)
                                                or not isinstance(prefix_cache_tokens, int) or prefix_cache_tokens < 0):
            raise ValueError(f"prefix_cache_tokens must be an integer >= 0, got {prefix_cache_tokens!r}")
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
        self._default_threads = torch.get_num_threads()
        self.metrics = Metrics(self._gauges)
        if hasattr(model, "kv_shape"):
            from .. import quant

            layers, heads, dim = model.kv_shape
            dtype = next(model.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            per_token = 2 * layers * heads * dim * torch.empty(0, dtype=dtype).element_size()
            tokens = kv_cache_tokens or default_kv_tokens(per_token, self.window, self.max_batch, block_size)
            cached = prefix_cache_tokens if prefix_cache_tokens is not None else DEFAULT_PREFIX_CACHE_TOKENS
            self.pool: BlockPool | None = BlockPool(layers, heads, dim, dtype, self.device, block_size,
                                                    -(-tokens // block_size), prefix_cache, cached // block_size)
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
        self._forget: list[tuple[list[int], int]] = []     # forget_prefix calls not yet done
        self._background = background
        # Owned by the engine thread:
        self.scheduler = Scheduler(self.runner, self.pool, tokenizer, self.window, self.max_batch, prefill_chunk,
                                   self.metrics)
        _engines.add(self)

    # -- any thread ------------------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise ValueError if ``request`` can never run here (its worst case exceeds the whole KV budget)."""
        if self.pool is not None:
            need = self.scheduler.blocks_for(request) * request.n
            if need > self.pool.num_blocks:
                bs = self.pool.block_size
                raise ValueError(f"the request needs up to {need * bs} tokens of KV cache (n={request.n} x prompt + "
                                 f"max_new_tokens) but the engine's budget is {self.pool.num_blocks * bs}; lower "
                                 "max_new_tokens or n, or give the engine a larger kv_cache_tokens")

    def submit(self, request: Request, *, tag: int = 0, events: "queue.SimpleQueue[Event] | None" = None) -> Handle:
        """Queue ``request``; returns its ``Handle`` (events on ``events``, or a new queue).

        Raises:
            ValueError: the request can never fit the KV budget (``check``).
            RuntimeError: the engine was closed.
        """
        self.check(request)
        handle = Handle(self, request, tag, events if events is not None else queue.SimpleQueue())
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            handle.position = len(self.scheduler.waiting) + len(self._inbox)
            self._inbox.append(handle)
            self._start()
            self._wake.notify()
        return handle

    def _start(self) -> None:
        """Start the engine thread if it is not running (called with the lock held)."""
        if self._thread is None and self._background:
            heap.bound_retention()     # a long prompt's temporaries must not stay in this thread's heap
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

    def forget_prefix(self, tokens: Seq[int], keep: int = 0) -> None:
        """Forget the cached keys/values of ``tokens`` after its first ``keep`` tokens and of everything cached
        after them (a conversation that was reset: its prompt and replies), at the next step; the KV memory then
        shrinks to what is still in use. Blocks a running sequence holds stay cached.

        Args:
            tokens: token ids from the sequence's start (e.g. a conversation's last prompt).
            keep: leading tokens to keep cached (e.g. a system prompt the next conversation starts with too).
        """
        if self.pool is None or not tokens:
            return
        with self._lock:
            self._forget.append((list(tokens), keep))
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
        return self.scheduler.busy() or bool(self._inbox)

    def _loop(self) -> None:
        # This thread's kernels: set here, explicitly, rather than inherited from whatever the process-wide
        # default is at the moment the thread's first parallel region runs (a load elsewhere may lower it).
        torch.set_num_threads(self.threads or self._default_threads)
        sched = self.scheduler
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._inbox or self._cancels or self._closed or self._clear or self._forget
                               or sched.busy()):
                        if not self._wake.wait(IDLE_EXIT_S) and not (self._inbox or self._cancels or self._clear
                                                                     or self._forget or sched.busy()):
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
            forget, self._forget = self._forget, []
        if self.pool is not None:
            if clear:
                self.pool.clear_prefixes()
            for tokens, keep in forget:
                self.pool.forget(tokens, keep)
        sched = self.scheduler
        sched.waiting.extend(inbox)
        for h in cancels:
            sched.end(h, "cancelled")
        if closed:
            for h in sched.in_flight():
                sched.end(h, "cancelled")
            with self._lock:
                self._thread = None
            return False
        try:
            sched.step()
        except Exception as e:     # a bug: end everything in flight rather than hang its callers
            log.exception("prosa engine step failed")
            for h in sched.in_flight():
                sched.end(h, "error", f"internal error: {e}", internal=True)
            sched.reset()
        self._settle()
        return True

    def _settle(self) -> None:
        """Between steps: shrink the KV tensors when demand fell (``BlockPool.settle``), and give the freed memory
        back to the system (glibc keeps freed heap memory otherwise; the pool's tensors are allocated in this
        thread's arena)."""
        if self.pool is not None and self.pool.settle():
            heap.trim()

    def _gauges(self) -> dict[str, float]:
        """The live gauges (read from any thread: plain reads of the engine thread's counters)."""
        return {"waiting": len(self.scheduler.waiting) + len(self._inbox), "running": self.scheduler.live,
                "kv_cache_usage": self.pool.used / self.pool.num_blocks if self.pool is not None else 0.0}


@atexit.register
def _close_all() -> None:
    for engine in list(_engines):
        engine.close(timeout=2.0)
