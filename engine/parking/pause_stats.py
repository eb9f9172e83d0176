"""How long each tool's pauses last, learned from the pauses seen so far.

Per tool name, the last `window` observed pauses form an empirical distribution. The
expected remaining pause of a request already parked for `elapsed` seconds is the mean of
(d - elapsed) over the observed pauses d longer than `elapsed`; a pause that outlasted every
observation is expected to last as long again (it is in the tail).
"""
from __future__ import annotations

import bisect
from collections import deque
from itertools import accumulate

DEFAULT_PAUSE_S = 1.0  # a tool never seen and no expected_pause_s given


class _ToolPauses:
    """One tool's last `window` pauses, also kept sorted with suffix sums: the expected
    remaining pause is asked for far more often (every memory-pressure decision) than a
    pause is observed (once per resume)."""

    def __init__(self, window: int):
        self.recent: deque[float] = deque(maxlen=window)
        self.ordered: list[float] = []
        self.suffix: list[float] = [0.0]  # suffix[i] = sum(ordered[i:])

    def add(self, seconds: float) -> None:
        if len(self.recent) == self.recent.maxlen:
            del self.ordered[bisect.bisect_left(self.ordered, self.recent[0])]
        self.recent.append(seconds)
        bisect.insort(self.ordered, seconds)
        self.suffix = list(accumulate(reversed(self.ordered), initial=0.0))[::-1]

    def mean_excess(self, elapsed: float) -> float | None:
        """Mean of (d - elapsed) over the pauses d longer than elapsed; None if none is."""
        i = bisect.bisect_right(self.ordered, elapsed)
        n = len(self.ordered) - i
        return (self.suffix[i] - n * elapsed) / n if n else None


class PauseStats:
    def __init__(self, window: int = 256, max_tools: int = 1024):
        self.window = window
        self.max_tools = max_tools
        self._seen: dict[str, _ToolPauses] = {}

    def observe(self, tool: str | None, seconds: float) -> None:
        if tool is None:
            return
        pauses = self._seen.get(tool)
        if pauses is None:
            if len(self._seen) >= self.max_tools:
                self._seen.pop(next(iter(self._seen)))  # forget the oldest tool name
            pauses = self._seen[tool] = _ToolPauses(self.window)
        pauses.add(seconds)

    def expected_remaining(self, tool: str | None, expected: float | None, elapsed: float) -> float:
        """Seconds still to wait: from the caller's expectation, else the tool's history,
        else DEFAULT_PAUSE_S."""
        if expected is not None:
            return expected - elapsed if expected > elapsed else elapsed
        pauses = self._seen.get(tool) if tool is not None else None
        if pauses is None:
            return DEFAULT_PAUSE_S - elapsed if DEFAULT_PAUSE_S > elapsed else elapsed
        excess = pauses.mean_excess(elapsed)
        return elapsed if excess is None else excess

    def summary(self) -> dict[str, dict]:
        out = {}
        for tool, pauses in self._seen.items():
            ordered = pauses.ordered
            out[tool] = {"pauses": len(ordered), "median_s": round(ordered[len(ordered) // 2], 3)}
        return out
