"""Latency histograms and prompt-token sources, observed once per finished request.

The engine calls `observe(outputs)` with each step's finished RequestOutputs; nothing here
runs per token or per step.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from kvtier.engine.outputs import RequestOutput

# Seconds; from a prefix served by the device to a long prompt on a CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str = "kvtier_"):
        self.prefix = prefix
        self.ttft = Histogram(prefix + "time_to_first_token_seconds",
                              "time from a request's arrival to its first output token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram(prefix + "time_per_output_token_seconds",
                              "mean time between output tokens of one request (one observation per request "
                              "with two or more output tokens)", buckets=TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram(prefix + "e2e_request_latency_seconds",
                             "time from a request's arrival to its end", buckets=E2E_BUCKETS, registry=registry)
        self.finished = Counter(prefix + "requests_finished", "requests that ended, by finish reason",
                                ["reason"], registry=registry)
        self._lock = threading.Lock()
        self._source_tokens: dict[str, int] = {}  # kv_sources summed over finished requests

    def observe(self, outputs: Iterable[RequestOutput]) -> None:
        for out in outputs:
            reason = out.outputs[0].finish_reason if out.outputs else None
            self.finished.labels(reason or "unknown").inc()
            m = out.metrics
            if m is not None:
                if m.first_token_time is not None:
                    self.ttft.observe(m.first_token_time - m.arrival_time)
                    n = len(out.outputs[0].token_ids) if out.outputs else 0
                    if n >= 2 and m.finished_time is not None:
                        self.tpot.observe((m.finished_time - m.first_token_time) / (n - 1))
                if m.finished_time is not None:
                    self.e2e.observe(m.finished_time - m.arrival_time)
            if out.kv_sources:
                with self._lock:
                    for source, n in out.kv_sources.items():
                        self._source_tokens[source] = self._source_tokens.get(source, 0) + n

    def source_families(self) -> Iterator[Metric]:
        """Prompt tokens by where their KV came from (device, each tier, computed) and each
        source's share of all prompt tokens of finished requests."""
        with self._lock:
            tokens = dict(self._source_tokens)
        total = sum(tokens.values())
        counts = CounterMetricFamily(self.prefix + "prompt_tokens_by_source",
                                     "prompt tokens of finished requests by where their KV came from "
                                     "(device, a tier's name, or computed)", labels=["source"])
        ratio = GaugeMetricFamily(self.prefix + "prefix_hit_ratio",
                                  "share of finished requests' prompt tokens served by each source "
                                  "(source=computed: the share recomputed)", labels=["source"])
        for source in sorted(tokens):
            counts.add_metric([source], tokens[source])
            ratio.add_metric([source], tokens[source] / total if total else 0.0)
        yield counts
        yield ratio
