"""Per-tier counters, updated under the tier's lock and read as a snapshot.

Read and write latencies are also kept as fixed-bucket histograms (one observation per
add() call that carries read_seconds / write_seconds, i.e. per batched tier call), so the
metrics layer can export them without kvstore depending on prometheus_client and without
any tier changing how it reports time.
"""
from __future__ import annotations

import bisect
import dataclasses
import threading
from dataclasses import dataclass

# Upper bounds (seconds) of the latency buckets: from a memcpy of one block to a stuck
# remote store. A last, unbounded bucket follows them.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_NUM_BUCKETS = len(LATENCY_BUCKETS_S) + 1
# add() keyword -> the bucket-count field it also feeds
_LATENCY_FIELDS = {"read_seconds": "read_latency_buckets", "write_seconds": "write_latency_buckets"}


def _empty_buckets() -> list[int]:
    return [0] * _NUM_BUCKETS


def latency_bucket(seconds: float) -> int:
    """Index of the bucket a duration falls in (bounds are inclusive, like Prometheus' `le`)."""
    return bisect.bisect_left(LATENCY_BUCKETS_S, seconds)


@dataclass
class TierStats:
    hits: int = 0  # blocks found by get
    misses: int = 0  # blocks asked for by get and not (validly) found
    bytes_read: int = 0
    bytes_written: int = 0
    used_bytes: int = 0
    evictions: int = 0
    errors: int = 0  # failed calls, corrupt values, dropped writes
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    puts: int = 0  # blocks stored
    skipped_writes: int = 0  # writes not done (admission, full, breaker open, back-pressure)
    # Caught faults by kind ("where: ExceptionType" -> count), see kvstore/faults.py. Plain
    # str -> int, so as_dict() stays JSON-friendly.
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    # Calls per latency bucket (not cumulative; bounds in LATENCY_BUCKETS_S, then +Inf).
    read_latency_buckets: list[int] = dataclasses.field(default_factory=_empty_buckets)
    write_latency_buckets: list[int] = dataclasses.field(default_factory=_empty_buckets)
    # Filled in by the hierarchy (kvstore/hierarchy.py), which knows them; 0 / empty for a
    # tier asked on its own.
    capacity_bytes: int = 0
    write_queue_bytes: int = 0  # bytes waiting in the tier's background writer now
    write_queue_drops: int = 0  # blocks the writer's queue refused or dropped at close
    breakers: dict[str, str] = dataclasses.field(default_factory=dict)  # target -> closed|open|half_open

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class StatsRecorder:
    """Thread-safe wrapper: tiers call add(...) from any thread; snapshot() copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = TierStats()

    def add(self, **deltas) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)
                buckets = _LATENCY_FIELDS.get(name)
                if buckets is not None:
                    getattr(self._stats, buckets)[latency_bucket(delta)] += 1

    def set(self, **values) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self._stats, name, value)

    def snapshot(self) -> TierStats:
        with self._lock:
            s = self._stats
            return dataclasses.replace(s, faults=dict(s.faults), breakers=dict(s.breakers),
                                       read_latency_buckets=list(s.read_latency_buckets),
                                       write_latency_buckets=list(s.write_latency_buckets))
