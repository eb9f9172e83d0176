"""Per-tier metric families, converted from the tier dicts of `kv_stats()` at scrape time.

The tiers keep plain counters and fixed latency buckets (kvtier/kvstore/stats.py); this is
the only place that turns them into Prometheus families, so kvstore stays free of
prometheus_client and nothing is added to a tier's hot path.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from kvtier.kvstore.circuit_breaker import CLOSED, HALF_OPEN, OPEN
from kvtier.kvstore.stats import LATENCY_BUCKETS_S

BREAKER_STATES = (CLOSED, HALF_OPEN, OPEN)

# (stats key, metric name without prefix / suffix, HELP); counters get `_total` from the library
_COUNTERS = (
    ("hits", "tier_hits", "blocks a tier served intact"),
    ("misses", "tier_misses", "blocks asked of a tier that it did not serve (absent or invalid)"),
    ("bytes_read", "tier_read_bytes", "bytes of blocks read from a tier"),
    ("bytes_written", "tier_written_bytes", "bytes of blocks written to a tier"),
    ("puts", "tier_stored_blocks", "blocks stored in a tier"),
    ("evictions", "tier_evictions", "blocks a tier evicted to stay within its capacity"),
    ("errors", "tier_errors", "tier faults: failed calls, corrupt values, failed writes"),
    ("skipped_writes", "tier_skipped_writes", "blocks not written to a tier (admission, full, breaker open, queue full)"),
    ("write_queue_drops", "tier_write_queue_drops", "blocks the tier's write queue refused or dropped at close"),
)
_GAUGES = (
    ("used_bytes", "tier_used_bytes", "bytes a tier holds now"),
    ("capacity_bytes", "tier_capacity_bytes", "byte budget of a tier"),
    ("write_queue_bytes", "tier_write_queue_bytes", "bytes waiting in the tier's background write queue"),
)
_LATENCIES = (
    ("read_latency_buckets", "read_seconds", "tier_read_latency_seconds", "duration of one batched read (get) from a tier"),
    ("write_latency_buckets", "write_seconds", "tier_write_latency_seconds", "duration of one batched write (put) to a tier"),
)


def is_tier_stats(value) -> bool:
    """True for a tier's entry in kv_stats() (the device, parking and connector entries are not)."""
    return isinstance(value, dict) and "bytes_read" in value and "hits" in value


def tier_families(kv_stats: dict, prefix: str = "kvtier_") -> Iterator[Metric]:
    tiers = [(name, s) for name, s in kv_stats.items() if is_tier_stats(s)]
    for key, name, help_ in _COUNTERS:
        fam = CounterMetricFamily(prefix + name, help_, labels=["tier"])
        for tier, s in tiers:
            fam.add_metric([tier], s.get(key, 0))
        yield fam
    for key, name, help_ in _GAUGES:
        fam = GaugeMetricFamily(prefix + name, help_, labels=["tier"])
        for tier, s in tiers:
            fam.add_metric([tier], s.get(key, 0))
        yield fam
    for key, seconds_key, name, help_ in _LATENCIES:
        fam = HistogramMetricFamily(prefix + name, help_, labels=["tier"])
        for tier, s in tiers:
            counts = s.get(key)
            if counts:
                fam.add_metric([tier], cumulative_buckets(counts), sum_value=s.get(seconds_key, 0.0))
        yield fam
    fam = GaugeMetricFamily(prefix + "tier_breaker_state",
                            "circuit breaker of a tier's target: 1 for the state it is in, 0 for the others",
                            labels=["tier", "target", "state"])
    for tier, s in tiers:
        for target, state in sorted(s.get("breakers", {}).items()):
            for candidate in BREAKER_STATES:
                fam.add_metric([tier, target, candidate], 1.0 if state == candidate else 0.0)
    yield fam


def cumulative_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (bounds LATENCY_BUCKETS_S, then +Inf) -> Prometheus' cumulative `le` buckets."""
    out, total = [], 0
    bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS_S), "+Inf"]
    for bound, n in zip(bounds, counts):
        total += n
        out.append((bound, total))
    return out
