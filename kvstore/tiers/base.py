"""The one interface every KV tier implements (DESIGN.md §5). Batch-first: every call takes
all the keys of a request, so a remote tier can answer in one round trip.

Blocks cross this interface as CPU tensors of one block's KV (all layers of one KV group,
page-first: `[num_layers, 2, block_size, kv_heads, head_dim]`). Memory tiers copy them into
a slab; byte tiers (disk, Redis, gRPC) encode them into a self-describing value
(kvstore/format/codec.py) and must verify it on the way back.

Failure contract: a tier never raises for a store fault (down server, corrupt value, full
disk). get() reports False for a block it cannot serve correctly, put() drops what it cannot
write; both count the fault in stats (and in `stats().faults` by kind, logged once per kind
through `_fault`). Exceptions are only for programming errors.

Writes are synchronous: put() returns once the blocks are stored (or dropped). Keeping a
slow tier off the engine loop is the hierarchy's job (one writer per slow tier, see
kvstore/hierarchy.py), so a tier never stacks a queue of its own behind that one. What a
hierarchy needs to know about a tier is declared here, not guessed from its class:
`writes_inline`, `supports_evict_hook` / `set_evict_hook`, `write_queue_bytes`, `flush`.
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence

import torch

from kvtier.kvstore.faults import FaultLog
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.stats import StatsRecorder, TierStats

log = logging.getLogger("kvtier.kvstore.tiers")

#: called with the keys and private copies of blocks a tier evicts (write-back spills)
EvictHook = Callable[[list[BlockKey], list[torch.Tensor]], None]


class Tier(abc.ABC):
    #: short name reported in kv_sources and stats ("cpu", "lmdb", "redis", "grpc")
    name: str = "tier"
    #: read bandwidth (bytes/s) assumed until reads have been measured; subclasses set theirs
    nominal_read_bandwidth: float = 1e9
    #: calls may wait on another process or a network (a frozen server, a slow link), so a
    #: connector asks it off the engine loop; local tiers (memory, a local disk) answer inline
    remote: bool = True
    #: put() is a memory copy, cheap enough to run on the caller's thread; a hierarchy
    #: writes every other tier through a background writer
    writes_inline: bool = False
    #: set_evict_hook() works: the tier hands what it evicts to a callback (write-back)
    supports_evict_hook: bool = False
    #: bound (bytes) for the queue a hierarchy's writer keeps for this tier, e.g. from the
    #: spec option `queue=`; None: the hierarchy's default
    write_queue_bytes: int | None = None
    #: where put / eviction / delete report KV events (kvstore/events.py); None: nobody listens
    _events = None

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"{self.name}: capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._stats = StatsRecorder()
        self._faults = FaultLog(log)

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
        s = self._stats.snapshot()
        s.faults = self._faults.counts()
        return s

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every put() so far is durable in the store; False on timeout. Writes
        are synchronous, so the default has nothing to wait for."""
        return True

    def missed_deadline(self) -> None:
        """A caller gave up waiting for this tier's answer (the call may still be stuck):
        count it as a failure now, e.g. on a circuit breaker, rather than when it ends."""

    def set_evict_hook(self, hook: EvictHook | None) -> None:
        """Hand what this tier evicts to `hook` (None: stop). Only for tiers that declare
        `supports_evict_hook`."""
        raise TypeError(f"{self.name} tier: does not report evictions (supports_evict_hook is False)")

    def set_event_sink(self, sink) -> None:
        """Report stored and removed blocks to `sink` (a kvstore.events.TierEventSink; None: stop)."""
        self._events = sink

    def close(self) -> None:
        """Release connections, threads and files; the tier is unusable afterwards."""

    def _fault(self, where: str, error: BaseException | str, **counts) -> None:
        """Count a caught fault (errors += 1 plus `counts`) and log it, rate-limited per kind."""
        self._faults.record(f"{self.name}.{where}", error)
        self._stats.add(errors=1, **counts)

    def read_bandwidth(self) -> float:
        """Bytes/s observed by get() (latency included), for the load-or-recompute decision;
        the tier's nominal figure until enough has been read to measure."""
        s = self._stats.snapshot()
        if s.read_seconds <= 0 or s.bytes_read < (1 << 20):
            return self.nominal_read_bandwidth
        return s.bytes_read / s.read_seconds
