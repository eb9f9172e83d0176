"""GET /metrics: a few engine gauges in Prometheus' text format (written by hand, so the
server needs no prometheus_client)."""
from __future__ import annotations


def _line(name: str, value, help_: str, labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name}{labels} {float(value)}"]


def render_metrics(kv_stats: dict, live_requests: int, in_flight: int, aborted: int) -> str:
    device = kv_stats.get("device", {})
    lines = ["# HELP kvtier_requests_aborted_total requests aborted (client gone, shutdown)",
             "# TYPE kvtier_requests_aborted_total counter", f"kvtier_requests_aborted_total {float(aborted)}"]
    lines += _line("kvtier_requests_in_flight", in_flight, "requests accepted by the server and not yet answered")
    lines += _line("kvtier_engine_requests", live_requests, "requests the engine holds (waiting or running)")
    lines += _line("kvtier_kv_blocks", device.get("blocks", 0), "device KV blocks")
    lines += _line("kvtier_kv_free_blocks", device.get("free_blocks", 0), "device KV blocks free (incl. cached)")
    lines += _line("kvtier_kv_cached_blocks", device.get("cached_blocks", 0), "device KV blocks holding a prefix")
    lines += _line("kvtier_prefix_hit_tokens", device.get("prefix_hit_tokens", 0), "prompt tokens found cached")
    lines += _line("kvtier_parked_requests", kv_stats.get("parking", {}).get("parked", 0), "parked requests")
    # One gauge per tier and numeric stat: kvtier_tier_hits{tier="cpu"} ...
    for tier, stats in kv_stats.items():
        if tier in ("device", "parking", "connector") or not isinstance(stats, dict):
            continue
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f'kvtier_tier_{key}{{tier="{tier}"}} {float(value)}')
    return "\n".join(lines) + "\n"
