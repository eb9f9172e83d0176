"""Prometheus metrics of one engine: its own CollectorRegistry, read at scrape time
(docs/metrics.md lists every metric)."""
from kvtier.engine.metrics.engine_metrics import EngineMetrics

__all__ = ["EngineMetrics"]
