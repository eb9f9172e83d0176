"""Per-request sampling settings, with vLLM's names and defaults, validated once at construction."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from kvtier.engine.parking.params import ParkParams

# vLLM's _SAMPLING_EPS: a temperature this small would overflow logits / T, and the
# distribution it describes is argmax anyway, so it is treated as greedy.
_SAMPLING_EPS = 1e-5

# torch.Generator.manual_seed accepts exactly this range; checking here turns a late
# RuntimeError inside the engine loop into a ValueError at the API boundary.
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1


def _is_int(value) -> bool:
    # bool subclasses int, but SamplingParams(top_k=True) is a bug, not a request for k=1.
    # numbers.Integral also admits numpy integers, which users pass from arrays.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    # Ints are always finite (math.isfinite would overflow on a huge one); floats must be.
    return _is_int(value) or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                              and math.isfinite(value))


@dataclass(kw_only=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (stop strings are checked by the engine).

    temperature=0 (below 1e-5) is greedy; top_k 0 or -1 disables top-k (-1 is stored as 0);
    `stop` is stored as a list; `stop_token_ids` as a list; `max_tokens=None` means
    "until the context is full", as in vLLM.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    # Park instead of release when the request stops (a tool call): engine/parking/.
    park: ParkParams | None = None
    # Batch-invariant logprobs (docs/determinism.md): None follows the engine's `deterministic`;
    # False opts out in a deterministic engine; True needs an engine started with deterministic=True.
    deterministic: bool | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.n):
            raise ValueError(f"n: must be an integer, got {self.n!r}")
        if self.n != 1:
            raise ValueError(f"n: only n=1 is supported, got {self.n}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k: must be an integer >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise ValueError(f"seed: must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens: must be None or an integer >= 1, got {self.max_tokens!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs: must be None or an integer >= 0, got {self.logprobs!r}")
        if self.deterministic is not None and not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic: must be None, True or False, got {self.deterministic!r}")
        if self.park is not None and not isinstance(self.park, ParkParams):
            raise ValueError(f"park: must be None or a ParkParams, got {self.park!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        # Normalise so downstream code sees one type per field: floats, k=0 for "off", lists.
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.top_k = max(int(self.top_k), 0)
        self.seed = None if self.seed is None else int(self.seed)
        self.max_tokens = None if self.max_tokens is None else int(self.max_tokens)
        self.logprobs = None if self.logprobs is None else int(self.logprobs)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS


def _normalise_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop: must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        # An empty stop string would match before every token and end the request at once.
        raise ValueError("stop: must not contain an empty string")
    return list(stop)


def _normalise_stop_token_ids(ids) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError(f"stop_token_ids: must be a list of integers >= 0, got {ids!r}")
    return [int(t) for t in ids]
