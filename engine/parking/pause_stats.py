"""How long each tool's pauses last, learned from the pauses seen so far.

Per tool name, the last `window` observed pauses form an empirical distribution. The
expected remaining pause of a request already parked for `elapsed` seconds is the mean of
(d - elapsed) over the observed pauses d longer than `elapsed`; a pause that outlasted every
observation is expected to last as long again (it is in the tail).
"""
from __future__ import annotations

from collections import deque

DEFAULT_PAUSE_S = 1.0  # a tool never seen and no expected_pause_s given


class PauseStats:
    def __init__(self, window: int = 256, max_tools: int = 1024):
        self.window = window
        self.max_tools = max_tools
        self._seen: dict[str, deque[float]] = {}

    def observe(self, tool: str | None, seconds: float) -> None:
        if tool is None:
            return
        pauses = self._seen.get(tool)
        if pauses is None:
            if len(self._seen) >= self.max_tools:
                self._seen.pop(next(iter(self._seen)))  # forget the oldest tool name
            pauses = self._seen[tool] = deque(maxlen=self.window)
        pauses.append(seconds)

    def expected_remaining(self, tool: str | None, expected: float | None, elapsed: float) -> float:
        """Seconds still to wait: from the caller's expectation, else the tool's history,
        else DEFAULT_PAUSE_S."""
        if expected is not None:
            return expected - elapsed if expected > elapsed else elapsed
        pauses = self._seen.get(tool) if tool is not None else None
        if not pauses:
            return DEFAULT_PAUSE_S - elapsed if DEFAULT_PAUSE_S > elapsed else elapsed
        longer = [d - elapsed for d in pauses if d > elapsed]
        return sum(longer) / len(longer) if longer else elapsed

    def summary(self) -> dict[str, dict]:
        out = {}
        for tool, pauses in self._seen.items():
            ordered = sorted(pauses)
            out[tool] = {"pauses": len(ordered), "median_s": round(ordered[len(ordered) // 2], 3)}
        return out
