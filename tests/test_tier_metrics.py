"""Per-tier metrics: latency buckets in the tiers' stats, what the hierarchy adds (capacity,
write-queue depth and drops, breaker state) and their Prometheus families."""
import threading

import pytest
from redis_server import free_port
from test_hierarchy import BLOCK, LAYOUT, DictTier, blocks, cpu, keys, load_ids

from kvtier.engine.metrics.tier_families import tier_families
from kvtier.kvstore.hierarchy import TierHierarchy
from kvtier.kvstore.stats import LATENCY_BUCKETS_S, StatsRecorder, latency_bucket
from kvtier.kvstore.tiers.spec import build_tier


def samples(kv_stats: dict) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in tier_families(kv_stats) for s in fam.samples}


def as_kv_stats(h: TierHierarchy) -> dict:
    return {name: s.as_dict() for name, s in h.stats().items()}


def test_latencies_fall_in_fixed_buckets_with_inclusive_bounds():
    rec = StatsRecorder()
    rec.add(read_seconds=0.003, bytes_read=10)
    rec.add(read_seconds=LATENCY_BUCKETS_S[0])  # exactly on a bound: that bucket (Prometheus' `le`)
    rec.add(read_seconds=99.0)  # beyond every bound: the +Inf bucket
    rec.add(write_seconds=0.0004)
    s = rec.snapshot()
    assert s.read_latency_buckets[latency_bucket(0.003)] == 1 and LATENCY_BUCKETS_S[latency_bucket(0.003)] == 0.005
    assert s.read_latency_buckets[0] == 1 and s.read_latency_buckets[-1] == 1 and sum(s.read_latency_buckets) == 3
    assert sum(s.write_latency_buckets) == 1 and s.bytes_read == 10
    rec.add(read_seconds=0.003)
    assert sum(s.read_latency_buckets) == 3  # a snapshot is a copy


def test_reads_and_writes_become_histograms_and_counters():
    h = TierHierarchy([cpu(8)])
    try:
        h.store(keys(range(4)), blocks(range(4)))
        ok, _ = load_ids(h, range(4), [0] * 4)
        assert ok == [True] * 4
        stats = as_kv_stats(h)
        m = samples(stats)
        cpu_ = (("tier", "cpu"),)
        assert m[("kvtier_tier_hits_total", cpu_)] == 4 == stats["cpu"]["hits"]
        assert m[("kvtier_tier_read_bytes_total", cpu_)] == 4 * BLOCK == stats["cpu"]["bytes_read"]
        assert m[("kvtier_tier_written_bytes_total", cpu_)] == 4 * BLOCK
        assert m[("kvtier_tier_capacity_bytes", cpu_)] == 8 * BLOCK
        assert m[("kvtier_tier_used_bytes", cpu_)] == 4 * BLOCK
        assert m[("kvtier_tier_read_latency_seconds_count", cpu_)] == 1  # one batched get
        assert m[("kvtier_tier_read_latency_seconds_sum", cpu_)] == pytest.approx(stats["cpu"]["read_seconds"])
        assert m[("kvtier_tier_read_latency_seconds_bucket", (("le", "+Inf"), ("tier", "cpu")))] == 1
        assert m[("kvtier_tier_write_latency_seconds_count", cpu_)] == 1
    finally:
        h.close()


def test_write_queue_depth_and_drops_are_reported():
    gate = threading.Event()
    slow = DictTier("slow", gate=gate)
    slow.write_queue_bytes = 2 * BLOCK
    h = TierHierarchy([cpu(64), slow])
    try:
        h.store(keys([0]), blocks([0]))
        assert slow.entered.wait(5)  # the writer is stuck in that put
        h.store(keys(range(1, 6)), blocks(range(1, 6)))  # 2 fit in the queue, 3 are dropped
        s = h.stats()["slow"]
        assert (s.write_queue_bytes, s.write_queue_drops, s.capacity_bytes) == (2 * BLOCK, 3, 1 << 30)
        m = samples(as_kv_stats(h))
        assert m[("kvtier_tier_write_queue_bytes", (("tier", "slow"),))] == 2 * BLOCK
        assert m[("kvtier_tier_write_queue_drops_total", (("tier", "slow"),))] == 3
        gate.set()
        assert h.flush(timeout=5)
        assert h.stats()["slow"].write_queue_bytes == 0
    finally:
        gate.set()
        h.close()


def test_breaker_state_of_a_down_redis_tier():
    redis = build_tier(f"redis://127.0.0.1:{free_port()}/0?timeout=0.2&breaker_failures=2&breaker_cooldown=30",
                       LAYOUT)
    h = TierHierarchy([cpu(8), redis])
    try:
        assert h.stats()["redis"].breakers == {"redis": "closed"}
        for _ in range(3):
            h.lookup(keys([0]))  # misses in cpu, then a failing call to the dead Redis
        assert h.stats()["redis"].breakers == {"redis": "open"}
        assert h.stats()["cpu"].breakers == {}  # no breaker: no series
        m = samples(as_kv_stats(h))
        state = lambda s: m[("kvtier_tier_breaker_state", (("state", s), ("target", "redis"), ("tier", "redis")))]
        assert (state("open"), state("closed"), state("half_open")) == (1.0, 0.0, 0.0)
    finally:
        h.close(timeout=1)
