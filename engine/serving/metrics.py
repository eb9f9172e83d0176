"""GET /metrics of `kvtier serve`: the engine's registry (engine/metrics/) followed by the
server's own counters, in Prometheus' text format."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ServerCollector:
    """Reads the AsyncEngine's request counts at scrape time."""

    def __init__(self, async_engine):
        self._engine = async_engine

    def collect(self):
        yield GaugeMetricFamily("kvtier_requests_in_flight", "requests accepted by the server and not yet answered",
                                value=self._engine.num_unfinished)
        yield CounterMetricFamily("kvtier_requests_aborted", "requests aborted (client gone, shutdown)",
                                  value=self._engine.num_aborted)


class ServerMetrics:
    """The server's own registry; its names never clash with the engine's."""

    def __init__(self, async_engine):
        self.registry = CollectorRegistry()
        self.registry.register(_ServerCollector(async_engine))

    async def render(self, async_engine) -> str:
        # The engine's text is generated on its loop thread, so a scrape never reads the
        # scheduler or the pools while a step changes them.
        engine_text = await async_engine.call(lambda eng: eng.metrics.text())
        return engine_text + generate_latest(self.registry).decode()
