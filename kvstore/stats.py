"""Per-tier counters, updated under the tier's lock and read as a snapshot."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass


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

    def set(self, **values) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self._stats, name, value)

    def snapshot(self) -> TierStats:
        with self._lock:
            return dataclasses.replace(self._stats, faults=dict(self._stats.faults))
