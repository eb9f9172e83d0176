"""`EngineMetrics`: one engine's CollectorRegistry, its scrape-time collector, and the
optional HTTP endpoint (EngineConfig.metrics_port)."""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from kvtier.engine.metrics.engine_families import engine_families
from kvtier.engine.metrics.request_metrics import RequestMetrics
from kvtier.engine.metrics.tier_families import tier_families
from kvtier.engine.outputs import RequestOutput

# kv_stats() may be read from a scrape thread while the engine steps; a dict it iterates
# can change size under it (RuntimeError), so it is read again a few times.
_STATS_TRIES = 3


class _EngineCollector:
    def __init__(self, engine, requests: RequestMetrics):
        self._engine = engine
        self._requests = requests

    def collect(self):
        stats = _read_kv_stats(self._engine)
        yield from engine_families(self._engine, stats)
        yield from self._requests.source_families()
        yield from tier_families(stats)


def _read_kv_stats(engine) -> dict:
    for attempt in range(_STATS_TRIES):
        try:
            return engine.kv_stats()
        except RuntimeError:
            if attempt == _STATS_TRIES - 1:
                raise
    return {}


class EngineMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.registry.register(_EngineCollector(engine, self.requests))
        self._http = None
        self.port: int | None = None

    def observe_finished(self, outputs: Iterable[RequestOutput]) -> None:
        """Latencies and prompt-token sources of requests that just finished."""
        self.requests.observe(outputs)

    def text(self) -> str:
        """This engine's metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry).decode()

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on `port` (0: any free port); returns the bound port."""
        if self._http is not None:
            raise RuntimeError(f"metrics: already served on port {self.port}")
        self._http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._http.server_port
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
