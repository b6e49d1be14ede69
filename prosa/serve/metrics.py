"""``GET /metrics``: the engine's numbers in Prometheus' text format (prometheus-client), read at scrape time."""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric


class EngineCollector:
    """Turns ``Engine.metrics.snapshot()`` into metric families (nothing is copied between scrapes)."""

    def __init__(self, snapshot: Callable[[], dict | None]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m = self.snapshot()
        if m is None:                      # the model is still loading
            m = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "prompt_tokens": 0, "generation_tokens": 0,
                 "prompt_tokens_cached": 0, "requests": {}, "ttft": None, "itl": None}
        yield GaugeMetricFamily("prosa_requests_running", "Sequences admitted to the engine (prefilling or decoding)",
                                value=m["running"])
        yield GaugeMetricFamily("prosa_requests_waiting", "Requests waiting for room in the engine",
                                value=m["waiting"])
        yield GaugeMetricFamily("prosa_kv_cache_usage_ratio", "Fraction of the KV cache budget in use",
                                value=m["kv_cache_usage"])
        yield CounterMetricFamily("prosa_prompt_tokens", "Prompt tokens of admitted requests",
                                  value=m["prompt_tokens"])
        yield CounterMetricFamily("prosa_prompt_tokens_cached", "Prompt tokens served from the prefix cache",
                                  value=m["prompt_tokens_cached"])
        yield CounterMetricFamily("prosa_generation_tokens", "Generated tokens", value=m["generation_tokens"])
        finished = CounterMetricFamily("prosa_request_finished", "Finished sequences by finish reason",
                                       labels=["finish_reason"])
        for reason, count in sorted(m["requests"].items()):
            finished.add_metric([reason], count)
        yield finished
        for name, key, doc in (("prosa_time_to_first_token_seconds", "ttft", "Time to the first token"),
                               ("prosa_inter_token_latency_seconds", "itl", "Time between tokens of a sequence")):
            h = m[key]
            buckets = [] if h is None else [(_le(b), n) for b, n in h.cumulative()]
            if not buckets:
                buckets = [("+Inf", 0)]
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=0.0 if h is None else h.total)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def registry(snapshot: Callable[[], dict | None]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(snapshot))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
