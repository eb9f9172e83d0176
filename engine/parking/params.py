"""What a request asks for when it parks at a tool call, validated once."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ParkParams:
    """`SamplingParams(park=ParkParams(...))`: when the request stops, park it instead of
    releasing it, so the next turn resumes from its KV.

    ttl_s: how long the parked state lives at most (then it is demoted and forgotten).
    expected_pause_s: how long the tool is expected to take, if the caller knows.
    tool: the tool's name; the engine learns each tool's pause durations from it.
    """

    ttl_s: float = 300.0
    expected_pause_s: float | None = None
    tool: str | None = None

    def __post_init__(self):
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, (int, float)) or not (
                0 < self.ttl_s < math.inf):
            raise ValueError(f"park.ttl_s: must be a number of seconds > 0, got {self.ttl_s!r}")
        pause = self.expected_pause_s
        if pause is not None and (isinstance(pause, bool) or not isinstance(pause, (int, float))
                                  or not 0 <= pause < math.inf):
            raise ValueError(f"park.expected_pause_s: must be None or a number of seconds >= 0, got {pause!r}")
        if self.tool is not None and (not isinstance(self.tool, str) or not self.tool):
            raise ValueError(f"park.tool: must be None or a non-empty string, got {self.tool!r}")
