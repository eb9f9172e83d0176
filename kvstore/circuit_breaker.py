"""A circuit breaker for remote tiers (Redis, gRPC): stop calling a store that keeps failing.

Without it, every engine step would pay a full socket timeout per call while a server is
down or hung. After `failure_threshold` consecutive failures the breaker opens: callers get
an immediate "no" (a miss, a skipped write) for `cooldown_s`. Then it lets exactly one
probe call through (half-open); its success closes the breaker, its failure re-opens it for
another cool-down. So a store that comes back is used again without restarting anything.

    if not breaker.allow():
        return miss
    try:
        result = call()
    except StoreError:
        breaker.record_failure(); return miss
    breaker.record_success()
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self, failure_threshold: int = 3, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ):
        if failure_threshold < 1:
            raise ValueError(f"circuit breaker: failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"circuit breaker: cooldown_s must be >= 0, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0  # consecutive failures while closed
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.times_opened = 0  # for stats and tests

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                return HALF_OPEN  # the next allow() will let a probe through
            return self._state

    def allow(self) -> bool:
        """True if the caller may try the store now (it must then record the outcome)."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN:
                if self._clock() - self._opened_at < self.cooldown_s:
                    return False
                self._state = HALF_OPEN
                self._probe_in_flight = False
            # Half-open: one probe at a time; everyone else still gets a fast "no".
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._probe_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            if self._state == HALF_OPEN:
                self._open()
                return
            self._failures += 1
            if self._state == CLOSED and self._failures >= self.failure_threshold:
                self._open()

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self._failures = 0
        self.times_opened += 1


def breaker_states(owner) -> dict[str, str]:
    """State of each circuit breaker an object (a tier) guards its calls with, by target,
    for stats and metrics. An owner with several targets (one breaker per server) reports
    them through a `breaker_states()` method; one with a single breaker exposes it as its
    public `breaker` attribute (target: the owner's name). Empty when it has none."""
    report = getattr(owner, "breaker_states", None)
    if callable(report):
        return dict(report())
    breaker = getattr(owner, "breaker", None)
    if isinstance(breaker, CircuitBreaker):
        return {getattr(owner, "name", "breaker"): breaker.state}
    return {}
