"""The disk tier: blocks in an LmdbStore (lmdb_store.py), one value (header + payload) each.

    lmdb:/var/cache/kvtier?size=64GiB&admit=2&codec=fp8&queue=256MiB

- get() decodes straight from the memory map into the caller's tensor (one copy), under a
  read transaction that never waits for a writer; its hits become LRU touches that the
  next write applies (lmdb_store.py explains why that is enough).
- put() encodes and commits in one write transaction, on the caller's thread. Under the
  tier hierarchy that thread is this tier's writer (kvstore/hierarchy.py), so the engine
  never waits on the disk; `queue=` bounds that writer's queue in bytes.
- The LRU index and the byte usage persist in the same environment, so a restarted
  process, or another process on the same directory, evicts correctly. A full map or disk
  is a skipped, counted write, never an exception.
- admit=N: only blocks offered N times (counted in this process) are written, sparing the
  disk one-off prefixes.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from kvtier.kvstore.format.codec import encode_block
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.stats import TierStats
from kvtier.kvstore.tiers.byte_store import ByteStoreTier, StoreUnavailable, decode_values
from kvtier.kvstore.tiers.lmdb_store import LmdbStore

DEFAULT_CAPACITY = 16 << 30
_ADMIT_MEMORY = 1 << 17  # how many recently offered keys admission remembers
_OPTIONS = ("codec", "admit", "map_size", "sync", "queue")


class LmdbTier(ByteStoreTier):
    name = "lmdb"
    remote = False

    def __init__(
        self,
        path: str,
        capacity_bytes: int = DEFAULT_CAPACITY,
        *,
        codec: str = "raw",
        admit: int = 1,
        map_size: int | None = None,
        sync: bool = True,
        write_queue_bytes: int | None = None,
    ):
        super().__init__(capacity_bytes, codec)
        if not path:
            raise ValueError("lmdb tier: needs a directory path")
        if admit < 1:
            raise ValueError(f"lmdb tier: admit must be >= 1, got {admit}")
        if write_queue_bytes is not None and write_queue_bytes <= 0:
            raise ValueError(f"lmdb tier: queue must be positive, got {write_queue_bytes}")
        self.store = LmdbStore(path, capacity_bytes, map_size=map_size, sync=sync)
        self.path = self.store.path
        self.map_size = self.store.map_size
        self.write_queue_bytes = write_queue_bytes
        self.admit = admit
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._seen_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec, layouts=None) -> "LmdbTier":
        spec.check_options(_OPTIONS)
        return cls(
            spec.target,
            spec.size or DEFAULT_CAPACITY,
            codec=spec.option("codec", "raw"),
            admit=spec.int_option("admit", 1, minimum=1),
            map_size=spec.size_option("map_size"),
            sync=spec.bool_option("sync", True),
            write_queue_bytes=spec.size_option("queue"),
        )

    # --- raw byte-store operations ----------------------------------------------------
    def _exists(self, keys: list[bytes]) -> list[bool]:
        return self.store.exists(keys)

    def _read(self, keys: list[bytes]) -> list[bytes | None]:
        return self.store.read(keys)

    def _read_into(self, raw_keys, keys, into):
        with self.store.views(raw_keys) as values:  # decoded while the views are valid
            return decode_values(values, keys, into)

    def _write(self, keys: list[bytes], values: list[bytes]) -> None:
        self.store.write(keys, values)

    def _remove(self, keys: list[bytes]) -> None:
        self.store.remove(keys)

    # --- the Tier interface -----------------------------------------------------------
    def get(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]) -> list[bool]:
        ok = super().get(keys, into)
        hits = [k.to_bytes() for k, hit in zip(keys, ok) if hit]
        if hits:
            self.store.touch(hits)
        return ok

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        keys, blocks = self._admitted(keys, blocks)
        if not keys:
            return
        start = time.perf_counter()
        values = [encode_block(k, b, self.codec) for k, b in zip(keys, blocks)]
        try:
            result = self.store.write([k.to_bytes() for k in keys], values)
        except StoreUnavailable as e:  # full map or disk, I/O error, closed
            self._fault("put", e, skipped_writes=len(keys))
            return
        self._stats.add(puts=len(keys), bytes_written=result.added_bytes, write_seconds=time.perf_counter() - start)
        if self._events is not None and self._events.active:
            self._report(keys, values, result)

    def _report(self, keys: Sequence[BlockKey], values: list[bytes], result) -> None:
        """KV events in the order the store applied them: room made in a full map, the
        blocks written, then what the write evicted (possibly some of those blocks)."""
        changes = [(False, BlockKey.from_bytes(k), 0) for k in result.room_evicted_keys]
        changes += [(True, k, len(v)) for k, v in zip(keys, values)]
        changes += [(False, BlockKey.from_bytes(k), 0) for k in result.evicted_keys]
        self._events.replay(changes)

    # flush(): nothing to wait for. Puts are committed when put() returns, and pending LRU
    # touches are only order: the next write applies them before it evicts, close() too. A
    # commit of its own here would cost an fsync per flush (half the put rate when puts and
    # hits alternate).

    def stats(self) -> TierStats:
        s = super().stats()
        s.used_bytes, s.evictions = self.store.used_bytes, self.store.evictions
        return s

    def disk_usage(self) -> tuple[int, int]:
        """(bytes of stored values, stored blocks), as the persisted index counts them."""
        return self.store.usage()

    def close(self) -> None:
        try:
            self.store.close()
        except StoreUnavailable as e:  # touches that could not be applied are only order
            self._fault("close", e)

    def _admitted(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]):
        if self.admit <= 1:
            return list(keys), list(blocks)
        out_k, out_b = [], []
        with self._seen_lock:
            for k, b in zip(keys, blocks):
                raw = k.to_bytes()
                count = self._seen.pop(raw, 0) + 1
                self._seen[raw] = count  # re-inserted last: most recently offered
                if count >= self.admit:
                    out_k.append(k)
                    out_b.append(b)
            while len(self._seen) > _ADMIT_MEMORY:
                self._seen.popitem(last=False)
        if len(out_k) < len(keys):
            self._stats.add(skipped_writes=len(keys) - len(out_k))
        return out_k, out_b
