"""A request's state as it moves through the scheduler."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvtier.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # a connector is loading its prefix
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    cache_salt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission; -1 = not yet scheduled.
    num_cached_tokens: int = -1
    status: RequestStatus = RequestStatus.WAITING
    hash_root: bytes = b""  # from the model namespace and cache_salt (block_hash.root_hash)
    # Chained hashes of this request's full blocks, extended as tokens are appended.
    block_hashes: list[bytes] = field(default_factory=list)
    generator: torch.Generator | None = None
    logprobs: list[dict] | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    # Prompt tokens by where their KV came from, fixed at first admission.
    kv_sources: dict[str, int] = field(default_factory=dict)
    # Queue order: arrival, or for a resumed turn its conversation's first arrival.
    priority: float = -1.0
    parked_id: str | None = None  # set when the request parked at its end
    holds_kv: bool = False  # a resumed turn that took over its parked blocks
    resumed_tokens: int = 0  # a resumed turn: length of the parked sequence it continues
    deterministic: bool = False  # batch-invariant kernels serve it (engine/determinism.py)
    prefetch_only: bool = False  # only load this prefix from the tiers onto the device, run nothing
    load_timed_out: bool = False  # its load timed out: it recomputes, asking the connector nothing more

    def __post_init__(self):
        if self.priority < 0:
            self.priority = self.arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating whole lists."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status.finished
