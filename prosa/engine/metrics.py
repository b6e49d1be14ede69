"""The engine's numbers, for ``prosa serve``'s ``/metrics`` and for tests: gauges, counters and histograms.

Written by the engine thread, read from any thread (``Metrics.snapshot``). Histogram buckets follow
Prometheus' convention (cumulative counts per upper bound, plus ``+Inf``), so an exporter can pass them on.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

# Seconds; vLLM's time-to-first-token and inter-token buckets, trimmed to what a CPU sees.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    """Observations counted per bucket (upper bounds), with their sum."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)     # the last one is +Inf

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, ending with (inf, count)."""
        out, run = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            run += n
            out.append((bound, run))
        return out


class Metrics:
    """Gauges (waiting, running, kv_cache_usage), counters (prompt/generated/cached tokens, requests by finish
    reason) and histograms (time to first token, inter-token latency, seconds)."""

    def __init__(self, gauges: Callable[[], dict[str, float]] | None = None) -> None:
        self._lock = threading.Lock()
        self._gauges = gauges            # reads the live gauges (waiting, running, kv_cache_usage)
        self.waiting = 0                 # requests not yet admitted
        self.running = 0                 # sequences admitted (prefilling or decoding)
        self.kv_cache_usage = 0.0        # fraction of the KV budget referenced by sequences
        self.prompt_tokens = 0           # prompt tokens of admitted requests (cached ones included)
        self.prompt_tokens_computed = 0  # tokens run through the model as prompts (prefix-cache hits excluded)
        self.prompt_tokens_cached = 0    # prompt tokens whose keys/values came from the prefix cache
        self.generation_tokens = 0
        self.requests: dict[str, int] = {}   # finish reason -> finished sequences
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def add(self, **counts: int) -> None:
        """Add to counters, e.g. ``add(generation_tokens=3)``."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def set(self, **gauges: float) -> None:
        with self._lock:
            for name, value in gauges.items():
                setattr(self, name, value)

    def finished(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def observe(self, histogram: str, value: float) -> None:
        with self._lock:
            getattr(self, histogram).observe(value)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every number (histograms as ``Histogram`` copies)."""
        if self._gauges is not None:
            self.set(**self._gauges())
        with self._lock:
            out = {k: v for k, v in vars(self).items() if not k.startswith("_") and not isinstance(v, Histogram)}
            out["requests"] = dict(self.requests)
            for name in ("ttft", "itl"):
                h = getattr(self, name)
                copy = Histogram(h.buckets)
                copy.counts, copy.total, copy.count = list(h.counts), h.total, h.count
                out[name] = copy
            return out
