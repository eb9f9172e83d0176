"""KV events: what happened to which block on which medium, and the bus that carries them.

Every block that becomes findable on a medium (the device pool, or a tier such as "cpu" or
"lmdb") is a `BlockStored`; every block that stops being findable there is a `BlockRemoved`;
a medium that forgets everything at once sends `AllBlocksCleared`. A router replaying them
in order knows which medium holds which prefix (docs/kv_events.md).

This module sits in kvstore/ because both sides emit: the engine's block pool and the
tiers below the connector. It imports nothing above kvstore.

The bus never blocks a producer. Each subscription has its own bounded queue (counted in
events); a batch that does not fit is dropped whole and counted on that subscription, so a
slow consumer loses events (and knows how many) while the engine keeps running.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

from kvtier.kvstore.keys import BlockKey

# Why a block was stored: computed on the device, loaded into the device from a tier, saved
# to a tier as a copy of a device block, promoted (copied up from a slower tier on a hit) or
# demoted (pushed down when the medium above evicted it, write-back).
STORE_CAUSES = ("computed", "loaded", "saved", "promoted", "demoted")
# Why a block was removed: evicted for room, deleted on request (or as corrupt).
REMOVE_CAUSES = ("evicted", "deleted")


@dataclass(frozen=True)
class BlockStored:
    kind: ClassVar[str] = "stored"
    block_hash: bytes
    parent_hash: bytes | None  # None for a prefix's first block, or where the medium does not know it
    token_ids: tuple[int, ...] | None  # None where the medium does not know them (tiers)
    num_tokens: int
    group: int
    medium: str
    size_bytes: int
    cause: str = "computed"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "block_hash": self.block_hash.hex(),
                "parent_hash": None if self.parent_hash is None else self.parent_hash.hex(),
                "token_ids": None if self.token_ids is None else list(self.token_ids),
                "num_tokens": self.num_tokens, "group": self.group, "medium": self.medium,
                "size_bytes": self.size_bytes, "cause": self.cause}


@dataclass(frozen=True)
class BlockRemoved:
    kind: ClassVar[str] = "removed"
    block_hash: bytes
    group: int
    medium: str
    size_bytes: int  # 0 where the medium does not know it
    cause: str = "evicted"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "block_hash": self.block_hash.hex(), "group": self.group,
                "medium": self.medium, "size_bytes": self.size_bytes, "cause": self.cause}


@dataclass(frozen=True)
class AllBlocksCleared:
    kind: ClassVar[str] = "cleared"
    medium: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "medium": self.medium}


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True)
class KVEventBatch:
    """Events in the order they happened on one producer, stamped when published."""

    ts: float  # time.time() at publication
    events: tuple[KVEvent, ...]


class KVEventSubscription:
    """One consumer's bounded queue. Iterating drains what is queued now (never blocks);
    `get(timeout)` waits for the next batch. `dropped` counts events lost to a full queue."""

    def __init__(self, bus: "KVEventBus", max_events: int):
        self._bus = bus
        self.max_events = max_events
        self._batches: deque[KVEventBatch] = deque()
        self._queued = 0  # events in _batches
        self._cond = threading.Condition()
        self.dropped = 0
        self.delivered = 0  # events handed to this consumer so far
        self.closed = False

    def _offer(self, batch: KVEventBatch) -> None:
        n = len(batch.events)
        with self._cond:
            if self._queued + n > self.max_events:
                self.dropped += n
                return
            self._batches.append(batch)
            self._queued += n
            self._cond.notify()

    def get(self, timeout: float | None = None) -> KVEventBatch | None:
        """The next batch, waiting up to `timeout` seconds (None: until one comes or the
        subscription closes); None when nothing came."""
        with self._cond:
            if not self._batches and not self.closed:
                self._cond.wait(timeout)
            if not self._batches:
                return None
            batch = self._batches.popleft()
            self._queued -= len(batch.events)
            self.delivered += len(batch.events)
            return batch

    def get_nowait(self) -> KVEventBatch | None:
        return self.get(timeout=0)

    def __iter__(self) -> Iterator[KVEvent]:
        while True:
            batch = self.get_nowait()
            if batch is None:
                return
            yield from batch.events

    @property
    def queued(self) -> int:
        return self._queued

    def close(self) -> None:
        """Stop receiving; a consumer waiting in get() wakes up with what is left."""
        self._bus._unsubscribe(self)
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class KVEventBus:
    """Fans batches out to subscriptions. `active` is False while nobody listens, so
    producers can skip building events entirely."""

    def __init__(self, default_queue_events: int = 10_000):
        if isinstance(default_queue_events, bool) or not isinstance(default_queue_events, int) \
                or default_queue_events <= 0:
            raise ValueError(f"kv_events_queue: must be a positive integer, got {default_queue_events!r}")
        self.default_queue_events = default_queue_events
        self._lock = threading.Lock()
        self._subs: tuple[KVEventSubscription, ...] = ()  # replaced, never mutated: lock-free reads
        self.published = 0  # events published while someone listened

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def subscribe(self, max_events: int | None = None) -> KVEventSubscription:
        n = self.default_queue_events if max_events is None else max_events
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"max_events: must be a positive integer, got {n!r}")
        sub = KVEventSubscription(self, n)
        with self._lock:
            self._subs = self._subs + (sub,)
        return sub

    def _unsubscribe(self, sub: KVEventSubscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def publish(self, events: Sequence[KVEvent]) -> None:
        subs = self._subs
        if not subs or not events:
            return
        batch = KVEventBatch(time.time(), tuple(events))
        with self._lock:  # tiers' writer threads publish too
            self.published += len(batch.events)
        for sub in subs:
            sub._offer(batch)

    def dropped(self) -> int:
        return sum(s.dropped for s in self._subs)


class TierEventSink:
    """What a tier reports its stores and removals to (installed by the hierarchy through
    `Tier.set_event_sink`). Tiers know keys and sizes only; the hierarchy says why a write
    happens (`cause`, per thread, since a tier's puts may run on different threads)."""

    def __init__(self, bus: KVEventBus, medium: str, block_size: int):
        self.bus = bus
        self.medium = medium
        self.block_size = block_size
        self._local = threading.local()

    @property
    def active(self) -> bool:
        return self.bus.active

    @contextlib.contextmanager
    def cause(self, cause: str):
        """Writes on this thread inside the block are stored for `cause` (default "saved")."""
        previous = getattr(self._local, "cause", "saved")
        self._local.cause = cause
        try:
            yield
        finally:
            self._local.cause = previous

    def stored_event(self, key: BlockKey, size: int) -> BlockStored:
        return BlockStored(key.block_hash, None, None, self.block_size, key.group, self.medium, size,
                           getattr(self._local, "cause", "saved"))

    def removed_event(self, key: BlockKey, size: int = 0, cause: str = "evicted") -> BlockRemoved:
        return BlockRemoved(key.block_hash, key.group, self.medium, size, cause)

    def stored(self, keys: Sequence[BlockKey], sizes: Sequence[int]) -> None:
        if self.bus.active and keys:
            self.bus.publish([self.stored_event(k, s) for k, s in zip(keys, sizes)])

    def removed(self, keys: Sequence[BlockKey], cause: str = "evicted", sizes: Sequence[int] | None = None) -> None:
        if self.bus.active and keys:
            sizes = sizes if sizes is not None else [0] * len(keys)
            self.bus.publish([self.removed_event(k, s, cause) for k, s in zip(keys, sizes)])

    def replay(self, changes: Sequence[tuple[bool, BlockKey, int]]) -> None:
        """(stored?, key, size) in the order they happened, as one batch (evictions a put
        makes interleave with its stores)."""
        if self.bus.active and changes:
            self.bus.publish([self.stored_event(k, s) if stored else self.removed_event(k, s)
                              for stored, k, s in changes])

    def cleared(self) -> None:
        if self.bus.active:
            self.bus.publish([AllBlocksCleared(self.medium)])
