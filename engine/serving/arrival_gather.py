"""How long an idle engine, woken by a request, waits for the requests arriving with it.

Clients of one conversation turn (a fan-out of agents, the users of a chat room, a
benchmark's users) send within tens of milliseconds of each other, not within one. A step
that starts with the first of them makes the rest queue behind its whole prefill, then run
in a partial step of their own, and the batch stays split to the end of its decode.

A burst is the requests submitted within `max_s` of its first. When the previous burst held
more than one request, an idle engine waits for the current burst until it is as large as
the previous one, or until no request has arrived for `window` x the longest span of the last
few bursts (at most `max_s` from the burst's first). Otherwise (a lone user, or the first
burst) it waits until none has arrived for `lone_s`, so the latency of a single request
barely changes. The quiet time counts from the latest arrival, not the first: the spans of
one workload's bursts vary several-fold (12 to 61 ms between turns of the serve benchmark),
and a burst still arriving is worth waiting for.
"""
from __future__ import annotations

from collections.abc import Callable

LONE_S = 0.003  # the wait when requests have not been arriving together
MAX_S = 0.1  # no gathering lasts longer
SPANS_KEPT = 8  # a burst is expected to last as long as the longest of the last few


class ArrivalGather:
    def __init__(self, window: float = 1.5, max_s: float = MAX_S, lone_s: float = LONE_S):
        if not 0 <= window <= 10:
            raise ValueError(f"gather_window: must be in [0, 10] (times the last burst's span), got {window}")
        self.window = window
        self.max_s = max_s
        self.lone_s = lone_s
        self._start = float("-inf")  # first and last arrival of the current burst
        self._last = float("-inf")
        self._size = 0
        self._prev_size = 0  # the previous burst's size
        self._spans: list[float] = []  # the spans of the last few bursts (first to last arrival)

    def arrived(self, at: float) -> None:
        """A request was submitted at `at` (the clock gather waits by)."""
        if at > self._start + self.max_s:
            if self._size:
                self._prev_size = self._size
                self._spans = self._spans[-(SPANS_KEPT - 1):] + [self._last - self._start]
            self._start, self._size = at, 0
        self._size += 1
        self._last = max(self._last, at)

    def deadline(self) -> float:
        """Until when to wait for more of the current burst (a past time: not at all)."""
        if not self.window:
            return float("-inf")
        if self._prev_size < 2:
            quiet = self.lone_s
        elif self._size >= self._prev_size:
            return float("-inf")
        else:
            quiet = self.window * max(self._spans) + self.lone_s
        return min(self._start + self.max_s, self._last + quiet)


def gather(gate: ArrivalGather, wait: Callable[[float], None], now: Callable[[], float]) -> None:
    """Wait until gate.deadline() passes; wait(timeout) returns early when something arrives,
    having handed it to the engine (and so to gate.arrived)."""
    while (left := gate.deadline() - now()) > 0:
        wait(left)
