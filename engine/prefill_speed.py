"""The engine's prefill speed (tokens/s), for deciding whether loading KV beats recomputing it."""
from __future__ import annotations

import time

import torch

from kvtier.engine.attention.ssm_metadata import NO_SLOT
from kvtier.engine.request import Request
from kvtier.engine.sampling_params import SamplingParams
from kvtier.engine.scheduler import ScheduledSeq, SchedulerOutput

_MIN_TOKENS = 64  # steps smaller than this are dominated by fixed costs, not prefill
_SMOOTHING = 0.2


class PrefillSpeed:
    def __init__(self) -> None:
        self._tokens_per_s: float | None = None

    def tokens_per_s(self) -> float | None:
        return self._tokens_per_s

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens < _MIN_TOKENS or seconds <= 0:
            return
        speed = num_tokens / seconds
        old = self._tokens_per_s
        self._tokens_per_s = speed if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * speed

    def measure(self, runner, num_tokens: int, pool_sizes: list[int]) -> None:
        """Time a throwaway forward over free blocks (their contents are garbage either way).
        pool_sizes: blocks (state slots) per KV group; a small pool's blocks are reused."""
        if num_tokens < _MIN_TOKENS:
            return
        needed = -(-num_tokens // runner.block_size)
        views = tuple((NO_SLOT, 0, []) if g.kind == "ssm" else [i % n for i in range(needed)]
                      for g, n in zip(runner.groups, pool_sizes))
        probe = Request("__prefill_probe__", [0] * num_tokens, SamplingParams(max_tokens=1, temperature=0))
        out = SchedulerOutput([ScheduledSeq(probe, 0, num_tokens, views)])
        with torch.inference_mode():
            runner.execute(out)  # warm-up: first calls pay allocator and kernel set-up
            start = time.perf_counter()
            runner.execute(out)
            self.observe(num_tokens, time.perf_counter() - start)
