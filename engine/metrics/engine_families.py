"""Engine-level metric families, read from the engine at scrape time: request queues, the
device KV pool, preemptions and failed loads (docs/metrics.md)."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


def device_pool_usage(device: dict, pools) -> dict[str, float]:
    """Used / capacity of the device KV pools in blocks and bytes. A block counts as used
    while a request references it; free blocks that still hold a cached prefix are free."""
    groups = device.get("groups") or [{"blocks": device.get("blocks", 0), "free_blocks": device.get("free_blocks", 0)}]
    used_blocks = capacity_blocks = used_bytes = capacity_bytes = 0
    for group, pool in zip(groups, pools):
        blocks, used = group["blocks"], group["blocks"] - group["free_blocks"]
        block_bytes = pool.numel() * pool.element_size() // max(pool.shape[0], 1)
        used_blocks += used
        capacity_blocks += blocks
        used_bytes += used * block_bytes
        capacity_bytes += blocks * block_bytes
    return {"used_blocks": used_blocks, "capacity_blocks": capacity_blocks,
            "used_bytes": used_bytes, "capacity_bytes": capacity_bytes}


def engine_families(engine, kv_stats: dict, prefix: str = "kvtier_") -> Iterator[Metric]:
    scheduler = engine.scheduler
    device = kv_stats.get("device", {})
    yield _gauge(prefix + "engine_requests", "requests the engine holds (waiting, loading or running)",
                 len(engine.requests))
    yield _counter(prefix + "engine_steps", "forward passes the engine ran", engine.num_steps)
    yield _counter(prefix + "engine_step_seconds", "seconds spent in forward passes", engine.step_seconds)
    yield _gauge(prefix + "running_requests", "requests being computed (prefill or decode)", len(scheduler.running))
    yield _gauge(prefix + "waiting_requests", "requests queued for admission", len(scheduler.waiting))
    yield _gauge(prefix + "loading_requests", "requests waiting for their prefix to load from a tier",
                 len(scheduler.loading))
    yield _gauge(prefix + "parked_requests", "requests parked at a tool call",
                 kv_stats.get("parking", {}).get("parked", 0))

    usage = device_pool_usage(device, engine.kv_pools)
    yield _gauge(prefix + "kv_used_blocks", "device KV blocks referenced by requests", usage["used_blocks"])
    yield _gauge(prefix + "kv_blocks", "device KV blocks in all pools", usage["capacity_blocks"])
    yield _gauge(prefix + "kv_used_bytes", "bytes of device KV blocks referenced by requests",
                 usage["used_bytes"])
    yield _gauge(prefix + "kv_capacity_bytes", "bytes of the device KV pools", usage["capacity_bytes"])
    # By bytes, so groups with blocks of different sizes (hybrid models) weigh what they hold.
    yield _gauge(prefix + "kv_usage_ratio", "share of the device KV pools' bytes referenced by requests (0..1)",
                 usage["used_bytes"] / usage["capacity_bytes"] if usage["capacity_bytes"] else 0.0)
    yield _gauge(prefix + "kv_free_blocks", "device KV blocks free (including those holding a cached prefix)",
                 usage["capacity_blocks"] - usage["used_blocks"])
    yield _gauge(prefix + "kv_cached_blocks", "device KV blocks holding a reusable prefix",
                 device.get("cached_blocks", 0))
    yield _counter(prefix + "kv_evictions", "cached device KV blocks reused for other data",
                   device.get("evictions", 0))
    yield _counter(prefix + "prefix_query_tokens", "prompt tokens looked up in the device prefix cache",
                   device.get("prefix_query_tokens", 0))
    yield _counter(prefix + "prefix_hit_tokens", "prompt tokens found in the device prefix cache",
                   device.get("prefix_hit_tokens", 0))

    yield _counter(prefix + "preemptions", "requests preempted (their KV freed, to be recomputed)",
                   device.get("preemptions", 0))
    yield _counter(prefix + "kv_load_failed_blocks", "blocks that failed to load from a tier and were recomputed",
                   device.get("load_failures", 0))
    calls = kv_stats.get("connector_calls", {})
    yield _counter(prefix + "kv_load_timeouts", "loads not reported within kv_load_timeout_s (recomputed)",
                   calls.get("load_timeouts", 0))
    yield _gauge(prefix + "kv_unsettled_loads", "timed-out loads not reported yet: their device blocks stay out of use",
                 calls.get("unsettled_loads", 0))
    recomputed = CounterMetricFamily(prefix + "recomputed_tokens",
                                     "tokens computed again: after a failed tier load, or after a preemption",
                                     labels=["reason"])
    recomputed.add_metric(["load_failure"], device.get("load_failures", 0) * engine.config.block_size)
    recomputed.add_metric(["preemption"], device.get("preempted_tokens", 0))
    yield recomputed
