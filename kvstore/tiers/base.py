"""The one interface every KV tier implements (DESIGN.md §5). Batch-first: every call takes
all the keys of a request, so a remote tier can answer in one round trip.

Blocks cross this interface as CPU tensors of one block's KV (all layers of one KV group,
page-first: `[num_layers, 2, block_size, kv_heads, head_dim]`). Memory tiers copy them into
a slab; byte tiers (disk, Redis, gRPC) encode them into a self-describing value
(kvstore/format/codec.py) and must verify it on the way back.

Failure contract: a tier never raises for a store fault (down server, corrupt value, full
disk). get() reports False for a block it cannot serve correctly, put() drops what it cannot
write; both count the fault in stats. Exceptions are only for programming errors.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.stats import StatsRecorder, TierStats


class Tier(abc.ABC):
    #: short name reported in kv_sources and stats ("cpu", "lmdb", "redis", "grpc")
    name: str = "tier"
    #: read bandwidth (bytes/s) assumed until reads have been measured; subclasses set theirs
    nominal_read_bandwidth: float = 1e9

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"{self.name}: capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._stats = StatsRecorder()

    @abc.abstractmethod
    def lookup_prefix(self, keys: Sequence[BlockKey]) -> int:
        """How many of `keys`, counted from the start, this tier holds (no side effects)."""

    @abc.abstractmethod
    def get(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]) -> list[bool]:
        """Copy each block into the tensor beside it; True where that block was served intact."""

    @abc.abstractmethod
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """Store blocks (idempotent for a key already present; may evict LRU blocks)."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[BlockKey]) -> None:
        """Forget these blocks (missing keys are ignored)."""

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Per-key presence; the default probes prefixes, tiers override with one round trip."""
        return [self.lookup_prefix([k]) == 1 for k in keys]

    def stats(self) -> TierStats:
        return self._stats.snapshot()

    def close(self) -> None:
        """Release connections, threads and files; the tier is unusable afterwards."""

    def read_bandwidth(self) -> float:
        """Bytes/s observed by get() (latency included), for the load-or-recompute decision;
        the tier's nominal figure until enough has been read to measure."""
        s = self._stats.snapshot()
        if s.read_seconds <= 0 or s.bytes_read < (1 << 20):
            return self.nominal_read_bandwidth
        return s.bytes_read / s.read_seconds
