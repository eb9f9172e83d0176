"""Faults that are caught and survived must still be seen: counted, and logged rate-limited.

Every `except Exception` on a path that keeps the engine alive (the hierarchy, the tiers'
writers, the connectors) reports what it caught here. The first occurrence of each kind
(where it happened + exception type) is logged with its message; later ones of the same
kind are logged at most once per `interval_s`, with how many were not logged. Counts per
kind are kept for `kv_stats()`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class FaultLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        if interval_s < 0:
            raise ValueError(f"fault log: interval_s must be >= 0, got {interval_s}")
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def record(self, where: str, error: BaseException | str) -> None:
        """Count one fault of kind `where: ExceptionType` and log it unless one of the
        same kind was logged less than `interval_s` ago."""
        kind = f"{where}: {type(error).__name__ if isinstance(error, BaseException) else 'error'}"
        now = self._clock()
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            last = self._last_logged.get(kind)
            if last is not None and now - last < self._interval:
                self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
                return
            self._last_logged[kind] = now
            skipped = self._unlogged.pop(kind, 0)
        more = f" ({skipped} more since the last report)" if skipped else ""
        self._log.warning("kvtier: %s: %s%s", kind, error, more,
                          exc_info=isinstance(error, BaseException) and last is None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
