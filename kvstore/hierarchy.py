"""The ordered tier hierarchy (DESIGN.md §5): fastest tier first, e.g. cpu -> lmdb -> redis.

- lookup: the longest prefix of blocks held anywhere, with the fastest tier holding each.
- load: one batched get per tier; a block a tier fails (missing, corrupt) falls back to the
  next tier down; blocks that came from below are promoted up.
- store: write-through (tier 0 now, lower tiers by their writers) or write-back (tier 0
  only; what a tier evicts is written to the tier below it, for tiers that report evictions).

Writes: a tier that `writes_inline` (host memory: a memcpy) is written on the caller's
thread. Every other tier has exactly one writer here, a BackgroundWriter
(tiers/background_writer.py): a queue bounded in bytes that drops and counts
(skipped_writes) what does not fit, applies what has queued up as one put, and on close
drains until a deadline, then drops and counts the rest. Tiers themselves write
synchronously, so there is no second queue behind this one.

No tier fault ever raises out of here: each is counted in that tier's stats and logged, the
first of each kind at once and then rate-limited (kvstore/faults.py); `fault_counts()` and
`stats()[name].faults` show the counts by kind.

KV events (docs/kv_events.md): `set_event_bus` gives each tier a sink under its name here;
tiers report what they store and evict, and every write says why (saved, promoted,
demoted), carried with the write through the writer queues.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence

import torch

from kvtier.kvstore.circuit_breaker import breaker_states
from kvtier.kvstore.events import TierEventSink
from kvtier.kvstore.faults import FaultLog
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.stats import StatsRecorder, TierStats
from kvtier.kvstore.tiers.background_writer import BackgroundWriter, WriterLimits
from kvtier.kvstore.tiers.base import Tier

log = logging.getLogger(__name__)

WRITE_POLICIES = ("write-through", "write-back")

# what a writer queues: keys, private copies, and why (a KV event cause, kvstore/events.py)
_Item = tuple[list[BlockKey], list[torch.Tensor], str]


def _nbytes(block: torch.Tensor) -> int:
    return block.numel() * block.element_size()


def _cpu_copies(blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Private host copies a background writer can read after the caller reuses `blocks`.
    Device blocks go down in one transfer (one sync) rather than one per block."""
    if not blocks:
        return []
    if blocks[0].is_cuda and all(b.device == blocks[0].device for b in blocks):
        return list(torch.stack([b.detach() for b in blocks]).to("cpu").unbind(0))
    return [b.detach().to("cpu", copy=True) for b in blocks]


def _fitting(writer: BackgroundWriter, sizes: Sequence[int]) -> int:
    """How many leading blocks the writer's queue takes now (earlier blocks are worth more
    to prefix lookups). An empty queue takes at least one, however large."""
    room = writer.room()
    n = total = 0
    for size in sizes:
        if total + size > room:
            break
        total += size
        n += 1
    if n == 0 and sizes and room == writer.limits.queue_bytes:
        n = 1
    return n


class TierHierarchy:
    def __init__(self, tiers: Sequence[Tier], write_policy: str = "write-through",
                 writer: WriterLimits = WriterLimits()):
        if not tiers:
            raise ValueError("tier hierarchy: needs at least one tier")
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy: unknown {write_policy!r}; choose one of {', '.join(WRITE_POLICIES)}")
        if not isinstance(writer, WriterLimits):
            raise ValueError(f"writer: expected WriterLimits, got {type(writer).__name__}")
        self.tiers: list[Tier] = list(tiers)
        self.write_policy = write_policy
        self.writer_limits = writer
        counts: dict[str, int] = {}
        for t in self.tiers:
            counts[t.name] = counts.get(t.name, 0) + 1
        self.names = [t.name if counts[t.name] == 1 else f"{t.name}{i}" for i, t in enumerate(self.tiers)]
        self._extra = [StatsRecorder() for _ in self.tiers]  # faults and drops seen here
        self._faults = [FaultLog(log) for _ in self.tiers]
        self._writers: list[BackgroundWriter | None] = [
            None if t.writes_inline else self._make_writer(i) for i, t in enumerate(self.tiers)
        ]
        if write_policy == "write-back":
            for i, t in enumerate(self.tiers[:-1]):
                if t.supports_evict_hook:
                    t.set_evict_hook(self._spill_to(i + 1))

    def _make_writer(self, t: int) -> BackgroundWriter:
        tier = self.tiers[t]
        limits = self.writer_limits
        if tier.write_queue_bytes is not None:  # the tier's spec asked for its own bound
            limits = dataclasses.replace(limits, queue_bytes=tier.write_queue_bytes)

        def apply(items: list[_Item]) -> None:
            sink = tier._events
            if sink is None or not sink.active:
                tier.put([k for ks, _, _ in items for k in ks], [b for _, bs, _ in items for b in bs])
                return
            for cause, run in itertools.groupby(items, key=lambda item: item[2]):  # one put per cause
                run = list(run)
                with sink.cause(cause):
                    tier.put([k for ks, _, _ in run for k in ks], [b for _, bs, _ in run for b in bs])

        def failed(items: list[_Item], error: BaseException) -> None:
            self._fault(t, "put", error, skipped_writes=sum(len(ks) for ks, *_ in items))

        return BackgroundWriter(apply, failed, limits, name=f"kvtier-writer-{self.names[t]}")

    # --- reads --------------------------------------------------------------------------
    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Tier index of each block in the longest prefix held anywhere (side-effect free)."""
        where: list[int | None] = [None] * len(keys)
        remaining = list(range(len(keys)))
        for t in range(len(self.tiers)):
            if not remaining:
                break
            present = self._contains(t, [keys[i] for i in remaining])
            still = []
            for i, hit in zip(remaining, present):
                if hit:
                    where[i] = t
                else:
                    still.append(i)
            remaining = still
        prefix: list[int] = []
        for t in where:
            if t is None:
                break
            prefix.append(t)
        return prefix

    def load(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor], locations: Sequence[int]) -> list[bool]:
        """Copy each block into the tensor beside it from the tier `locations` names, falling
        back down the hierarchy where a tier fails a block; True where a block was loaded."""
        if not len(keys) == len(into) == len(locations):
            raise ValueError(f"load: {len(keys)} keys, {len(into)} tensors, {len(locations)} locations")
        num_tiers = len(self.tiers)
        pending: list[list[int]] = [[] for _ in range(num_tiers)]
        for i, t in enumerate(locations):
            if not 0 <= t < num_tiers:
                raise ValueError(f"load: location {t} is not a tier index (0..{num_tiers - 1})")
            pending[t].append(i)
        ok = [False] * len(keys)
        source = [-1] * len(keys)
        for t in range(num_tiers):
            idx = sorted(pending[t])
            if not idx:
                continue
            flags = self._get(t, [keys[i] for i in idx], [into[i] for i in idx])
            failed = []
            for i, good in zip(idx, flags):
                if good:
                    ok[i], source[i] = True, t
                else:
                    failed.append(i)
            if failed and t + 1 < num_tiers:
                pending[t + 1].extend(failed)
        self._promote(keys, into, source)
        return ok

    # --- writes -------------------------------------------------------------------------
    def store(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """Save freshly computed blocks. Returns once the caller may reuse `blocks`."""
        if len(keys) != len(blocks):
            raise ValueError(f"store: {len(keys)} keys but {len(blocks)} blocks")
        if not keys:
            return
        targets = range(len(self.tiers)) if self.write_policy == "write-through" else [0]
        # write-back stores what the device evicts: a move down, not a copy
        cause = "saved" if self.write_policy == "write-through" else "demoted"
        for t in targets:
            if self._writers[t] is None:
                self._put_inline(t, keys, blocks, cause)
        self._enqueue_copies([t for t in targets if self._writers[t] is not None], keys, blocks, cause)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done (top down, since write-back spills flow
        downward) and each tier's `flush` has returned; False if `timeout` seconds passed."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        for i, (tier, w) in enumerate(zip(self.tiers, self._writers)):
            if w is not None and not w.flush(left()):
                return False
            try:
                if not tier.flush(left()):
                    return False
            except Exception as e:
                self._fault(i, "flush", e)
        return True

    def stats(self) -> dict[str, TierStats]:
        """Each tier's own stats plus what the hierarchy saw for it (faults, drops)."""
        out = {}
        for i, (name, tier, extra) in enumerate(zip(self.names, self.tiers, self._extra)):
            try:
                s = tier.stats()
            except Exception as e:
                self._fault(i, "stats", e)
                s = TierStats()
            own = extra.snapshot()
            faults = dict(s.faults)
            for kind, n in self._faults[i].counts().items():
                faults[kind] = faults.get(kind, 0) + n
            writer = self._writers[i]
            out[name] = dataclasses.replace(
                s, errors=s.errors + own.errors, faults=faults, skipped_writes=s.skipped_writes + own.skipped_writes,
                capacity_bytes=tier.capacity_bytes, write_queue_drops=own.write_queue_drops,
                write_queue_bytes=writer.queued_bytes() if writer is not None else 0,
                breakers=breaker_states(tier))
        return out

    def set_event_bus(self, bus, block_size: int) -> None:
        """Report every tier's stores and removals to `bus` (a kvstore.events.KVEventBus),
        each tier under its name here as the medium; None stops."""
        for name, tier in zip(self.names, self.tiers):
            tier.set_event_sink(None if bus is None else TierEventSink(bus, name, block_size))

    def fault_counts(self) -> dict[str, dict[str, int]]:
        """Caught faults by tier and kind ("lmdb.put: MapFullError" -> count)."""
        return {name: s.faults for name, s in self.stats().items()}

    def close(self, timeout: float | None = None) -> None:
        """Drain the writers (top down) until `timeout` seconds (default: the writer limits'
        close_timeout_s), drop and count what is left, then close the tiers."""
        timeout = self.writer_limits.close_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for i, w in enumerate(self._writers):
            if w is None:
                continue
            dropped = w.close(max(0.0, deadline - time.monotonic()))
            if dropped:
                n = sum(len(ks) for ks, *_ in dropped)
                self._extra[i].add(skipped_writes=n, write_queue_drops=n)
        for i, tier in enumerate(self.tiers):
            try:
                if tier.supports_evict_hook:
                    tier.set_evict_hook(None)
                tier.close()
            except Exception as e:
                self._fault(i, "close", e)

    # --- helpers ------------------------------------------------------------------------
    def _fault(self, t: int, op: str, error: BaseException, **counts) -> None:
        """Count a fault of tier t caught here (errors + `counts`) and log it, rate-limited."""
        self._faults[t].record(f"{self.names[t]}.{op}", error)
        self._extra[t].add(errors=1, **counts)

    def _promote(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor], source: list[int]) -> None:
        """Copy blocks served from below into the tiers above them: tier 0 always (the next
        request for this prefix gets it from the fastest tier); under write-through also the
        tiers in between."""
        up = [i for i, t in enumerate(source) if t > 0]
        if not up:
            return
        last = max(source) if self.write_policy == "write-through" else 1
        for t in range(last):
            idx = [i for i in up if source[i] > t]
            self._write(t, [keys[i] for i in idx], [into[i] for i in idx], "promoted")

    def _write(self, t: int, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor], cause: str) -> None:
        if self._writers[t] is None:
            self._put_inline(t, keys, blocks, cause)
        else:
            self._enqueue_copies([t], keys, blocks, cause)

    def _put_inline(self, t: int, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor], cause: str) -> None:
        sink = self.tiers[t]._events
        try:
            if sink is None:
                self.tiers[t].put(keys, blocks)
            else:
                with sink.cause(cause):
                    self.tiers[t].put(keys, blocks)
        except Exception as e:
            self._fault(t, "put", e, skipped_writes=len(keys))

    def _enqueue_copies(self, tiers: Sequence[int], keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor],
                        cause: str) -> None:
        """Hand private copies to the writers of `tiers`, copying only what some queue has
        room for (under back-pressure the engine should not copy blocks that will be dropped)."""
        if not tiers or not keys:
            return
        sizes = [_nbytes(b) for b in blocks]
        fits = [_fitting(self._writers[t], sizes) for t in tiers]
        copies = _cpu_copies(blocks[: max(fits)])
        for t, n in zip(tiers, fits):
            self._submit(t, list(keys[:n]), copies[:n], sizes[:n], cause)
            if n < len(keys):
                self._extra[t].add(skipped_writes=len(keys) - n, write_queue_drops=len(keys) - n)

    def _submit(self, t: int, keys: list[BlockKey], copies: list[torch.Tensor], sizes: Sequence[int],
                cause: str) -> None:
        if keys and not self._writers[t].submit((keys, copies, cause), sum(sizes)):
            self._extra[t].add(skipped_writes=len(keys), write_queue_drops=len(keys))  # filled up (or closed) meanwhile

    def _spill_to(self, t: int):
        """Evict hook for write-back: blocks leaving tier t-1 go to tier t (they are
        already private copies, so no second copy)."""

        def spill(keys: list[BlockKey], blocks: list[torch.Tensor]) -> None:
            if self._writers[t] is None:
                self._put_inline(t, keys, blocks, "demoted")
                return
            sizes = [_nbytes(b) for b in blocks]
            n = _fitting(self._writers[t], sizes)
            self._submit(t, keys[:n], blocks[:n], sizes[:n], "demoted")
            if n < len(keys):
                self._extra[t].add(skipped_writes=len(keys) - n, write_queue_drops=len(keys) - n)

        return spill

    def _contains(self, t: int, keys: list[BlockKey]) -> list[bool]:
        try:
            return list(self.tiers[t].contains(keys))
        except Exception as e:
            self._fault(t, "contains", e)
            return [False] * len(keys)

    def _get(self, t: int, keys: list[BlockKey], into: list[torch.Tensor]) -> list[bool]:
        try:
            return list(self.tiers[t].get(keys, into))
        except Exception as e:
            self._fault(t, "get", e)
            return [False] * len(keys)
