"""The ordered tier hierarchy (DESIGN.md §5): fastest tier first, e.g. cpu -> lmdb -> redis.

- lookup: the longest prefix of blocks held anywhere, with the fastest tier holding each.
- load: one batched get per tier; a block a tier fails (missing, corrupt) falls back to the
  next tier down; blocks that came from below are promoted up.
- store: write-through (tier 0 now, lower tiers by background writers) or write-back (tier 0
  only; what a tier evicts is written to the tier below it).

Tier 0, when it is host memory, is written inline (a memcpy); every other write runs on a
per-tier background thread behind a bounded queue that drops and counts when full, so the
engine loop never waits on a disk or a socket. No tier fault ever raises out of here.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch

from kvtier.kvstore.tiers.cpu_tier import CpuTier
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.stats import StatsRecorder, TierStats
from kvtier.kvstore.tiers.base import Tier

WRITE_POLICIES = ("write-through", "write-back")


class _TierWriter:
    """One thread writing into one tier. enqueue() never blocks: what does not fit in the
    queue (`max_blocks` blocks) is dropped and counted. Whatever has queued up is written in
    one put (one transaction / one pipeline); an exception from the tier is counted, and
    the thread keeps running."""

    def __init__(self, tier: Tier, max_blocks: int, stats: StatsRecorder, name: str):
        self.tier = tier
        self.max_blocks = max_blocks
        self._stats = stats  # the hierarchy's own counters for this tier (drops, errors)
        self._items: deque[tuple[list[BlockKey], list[torch.Tensor]]] = deque()
        self._queued = 0  # blocks in _items (a put in progress holds at most max_blocks more)
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"kvtier-writer-{name}", daemon=True)
        self._thread.start()

    def room(self) -> int:
        with self._cond:
            return 0 if self._closed else self.max_blocks - self._queued

    def enqueue(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """Queue a prefix of the batch that fits (earlier blocks are worth more to prefix
        lookups); `blocks` may be shorter than `keys` when the caller already knew the room."""
        with self._cond:
            n = min(len(blocks), 0 if self._closed else self.max_blocks - self._queued)
            if n > 0:
                self._items.append((list(keys[:n]), list(blocks[:n])))
                self._queued += n
                self._cond.notify_all()
        if n < len(keys):
            self._stats.add(skipped_writes=len(keys) - max(n, 0))

    def flush(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self, timeout: float | None) -> None:
        with self._cond:
            self._closed = True
            dropped, self._queued = self._queued, 0
            self._items.clear()
            self._cond.notify_all()
        if dropped:
            self._stats.add(skipped_writes=dropped)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closed)
                if self._closed:
                    return
                keys: list[BlockKey] = []
                blocks: list[torch.Tensor] = []
                while self._items:
                    k, b = self._items.popleft()
                    keys += k
                    blocks += b
                self._queued = 0
                self._busy = True
            try:
                self.tier.put(keys, blocks)
            except Exception:  # a tier bug must not kill the writer
                self._stats.add(errors=1, skipped_writes=len(keys))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _cpu_copies(blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Private host copies a background writer can read after the caller reuses `blocks`.
    Device blocks go down in one transfer (one sync) rather than one per block."""
    if not blocks:
        return []
    if blocks[0].is_cuda and all(b.device == blocks[0].device for b in blocks):
        return list(torch.stack([b.detach() for b in blocks]).to("cpu").unbind(0))
    return [b.detach().to("cpu", copy=True) for b in blocks]


class TierHierarchy:
    def __init__(self, tiers: Sequence[Tier], write_policy: str = "write-through", queue_blocks: int = 256):
        if not tiers:
            raise ValueError("tier hierarchy: needs at least one tier")
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy: unknown {write_policy!r}; choose one of {', '.join(WRITE_POLICIES)}")
        if queue_blocks < 1:
            raise ValueError(f"queue_blocks: must be >= 1, got {queue_blocks}")
        self.tiers: list[Tier] = list(tiers)
        self.write_policy = write_policy
        self.queue_blocks = queue_blocks
        counts: dict[str, int] = {}
        for t in self.tiers:
            counts[t.name] = counts.get(t.name, 0) + 1
        self.names = [t.name if counts[t.name] == 1 else f"{t.name}{i}" for i, t in enumerate(self.tiers)]
        self._extra = [StatsRecorder() for _ in self.tiers]  # faults seen by the hierarchy itself
        # Host memory at the top is written inline; every other tier gets a writer thread.
        self._writers: list[_TierWriter | None] = [
            None if i == 0 and isinstance(t, CpuTier) else _TierWriter(t, queue_blocks, self._extra[i], self.names[i])
            for i, t in enumerate(self.tiers)
        ]
        if write_policy == "write-back":
            for i, t in enumerate(self.tiers[:-1]):
                if isinstance(t, CpuTier):
                    t.on_evict = self._spill_to(i + 1)

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
        queued = list(range(1, len(self.tiers))) if self.write_policy == "write-through" else []
        if self._writers[0] is None:
            self._write(0, keys, blocks)
        else:
            queued.insert(0, 0)
        self._enqueue_copies(queued, keys, blocks)  # one private copy shared by all writers

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done (top down, since write-back spills flow
        downward), including a tier's own write queue where it has one (`tier.flush`);
        False if `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        for i, (tier, w) in enumerate(zip(self.tiers, self._writers)):
            if w is not None and not w.flush(left()):
                return False
            tier_flush = getattr(tier, "flush", None)
            if callable(tier_flush):
                try:
                    if tier_flush(left()) is False:
                        return False
                except Exception:
                    self._extra[i].add(errors=1)
        return True

    def stats(self) -> dict[str, TierStats]:
        out = {}
        for name, tier, extra in zip(self.names, self.tiers, self._extra):
            try:
                s = tier.stats()
            except Exception:
                s = TierStats(errors=1)
            e = extra.snapshot()
            out[name] = dataclasses.replace(
                s, errors=s.errors + e.errors, skipped_writes=s.skipped_writes + e.skipped_writes
            )
        return out

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish queued writes (up to `timeout` seconds), stop the writers, close the tiers."""
        self.flush(timeout)
        for w in self._writers:
            if w is not None:
                w.close(timeout)
        for i, tier in enumerate(self.tiers):
            if isinstance(tier, CpuTier):
                tier.on_evict = None
            try:
                tier.close()
            except Exception:
                self._extra[i].add(errors=1)

    # --- helpers ------------------------------------------------------------------------
    def _promote(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor], source: list[int]) -> None:
        """Copy blocks served from below into the tiers above them: tier 0 always (the next
        request for this prefix gets it from the fastest tier); under write-through also the
        tiers in between, through their writers."""
        up = [i for i, t in enumerate(source) if t > 0]
        if not up:
            return
        self._write(0, [keys[i] for i in up], [into[i] for i in up])
        if self.write_policy == "write-through":
            for t in range(1, max(source)):
                idx = [i for i in up if source[i] > t]
                self._enqueue_copies([t], [keys[i] for i in idx], [into[i] for i in idx])

    def _write(self, t: int, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        writer = self._writers[t]
        if writer is not None:
            self._enqueue_copies([t], keys, blocks)
            return
        try:
            self.tiers[t].put(keys, blocks)
        except Exception:
            self._extra[t].add(errors=1, skipped_writes=len(keys))

    def _enqueue_copies(self, tiers, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """Hand private copies to the writers of `tiers`, copying only what some queue has
        room for (under back-pressure the engine should not copy blocks that will be dropped)."""
        writers = [self._writers[t] for t in tiers]
        if not writers or not keys:
            return
        need = min(len(keys), max(w.room() for w in writers))
        copies = _cpu_copies(blocks[: max(need, 0)])
        for w in writers:
            w.enqueue(keys, copies)

    def _spill_to(self, t: int):
        """on_evict hook for write-back: blocks leaving tier t-1 go to tier t (they are
        already private copies, so no second copy)."""

        def spill(keys: list[BlockKey], blocks: list[torch.Tensor]) -> None:
            self._writers[t].enqueue(keys, blocks)

        return spill

    def _contains(self, t: int, keys: list[BlockKey]) -> list[bool]:
        try:
            return list(self.tiers[t].contains(keys))
        except Exception:
            self._extra[t].add(errors=1)
            return [False] * len(keys)

    def _get(self, t: int, keys: list[BlockKey], into: list[torch.Tensor]) -> list[bool]:
        try:
            return list(self.tiers[t].get(keys, into))
        except Exception:
            self._extra[t].add(errors=1)
            return [False] * len(keys)
