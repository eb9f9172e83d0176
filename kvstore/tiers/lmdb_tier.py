"""The disk tier: one LMDB environment per directory, one value (header + payload) per block.

    lmdb:/var/cache/kvtier?size=64GiB&admit=2&codec=fp8

- Reads run in the caller's thread under an LMDB read transaction: MVCC readers never wait
  for writers (not even another process's), and get() decodes straight from the memory map
  into the caller's tensor, one copy.
- put() encodes and hands the values to a background writer (background_writer.py), which
  commits everything queued so far in one write transaction; a full queue drops the write
  and counts it. flush() waits for the writer. LRU touches from hits go the same way.
- The LRU index and the byte usage live in the same environment (lmdb_index.py), so a
  restarted process, or another process on the same directory, evicts correctly.
- Capacity: after each batch the oldest values are evicted until usage <= size. The memory
  map is larger than `size` (LMDB needs room for pages freed but still seen by readers); if
  it fills anyway, the writer evicts to make room and retries once, else skips the batch and
  counts it. It never raises into the engine.
- admit=N: only blocks offered N times (counted in this process) are written, sparing the
  disk one-off prefixes.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import lmdb
import torch

from kvtier.kvstore.tiers.background_writer import BackgroundWriter
from kvtier.kvstore.tiers.byte_store import ByteStoreTier, StoreUnavailable
from kvtier.kvstore.format.codec import encode_block
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.lmdb_envs import acquire_env, release_env
from kvtier.kvstore.tiers.lmdb_index import LruIndex

DEFAULT_CAPACITY = 16 << 30
DEFAULT_QUEUE_BYTES = 256 << 20
_BATCH_BYTES = 64 << 20  # one write transaction; bounds the pages a batch can pin
_ADMIT_MEMORY = 1 << 17  # how many recently offered keys admission remembers
_TOUCH_COST = 64  # queue bytes charged per LRU touch, so touches are bounded too
_OPTIONS = ("codec", "admit", "map_size", "sync", "queue")


class LmdbTier(ByteStoreTier):
    name = "lmdb"

    def __init__(
        self,
        path: str,
        capacity_bytes: int = DEFAULT_CAPACITY,
        *,
        codec: str = "raw",
        admit: int = 1,
        map_size: int | None = None,
        sync: bool = True,
        max_queued_bytes: int = DEFAULT_QUEUE_BYTES,
    ):
        super().__init__(capacity_bytes, codec)
        if not path:
            raise ValueError("lmdb tier: needs a directory path")
        if admit < 1:
            raise ValueError(f"lmdb tier: admit must be >= 1, got {admit}")
        self.path = os.path.abspath(os.path.expanduser(path))
        # Twice the budget plus slack: LMDB cannot reuse pages that an open reader still sees
        # or that this transaction freed, so usage on the map runs ahead of `size`. The map
        # is only address space; the file grows as pages are used.
        self._env = acquire_env(self.path, map_size or 2 * capacity_bytes + (64 << 20), sync)
        try:
            self.map_size = self._env.info()["map_size"]  # another tier here may have opened it
            self._index = LruIndex(self._env)
            self._stats.set(used_bytes=self._index.used_bytes())
        except BaseException:
            release_env(self.path)
            raise
        self.admit = admit
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._local = threading.local()  # the read transaction get() is decoding under
        self._closed = False
        self._writer = BackgroundWriter(self._apply_batch, max_queued_bytes, _BATCH_BYTES, name="kvtier-lmdb-writer")

    @classmethod
    def from_spec(cls, spec, layout=None) -> "LmdbTier":
        spec.check_options(_OPTIONS)
        return cls(
            spec.target,
            spec.size or DEFAULT_CAPACITY,
            codec=spec.option("codec", "raw"),
            admit=spec.int_option("admit", 1, minimum=1),
            map_size=spec.size_option("map_size"),
            sync=spec.bool_option("sync", True),
            max_queued_bytes=spec.size_option("queue", DEFAULT_QUEUE_BYTES),
        )

    # --- raw byte-store operations ----------------------------------------------------
    def _exists(self, keys: list[bytes]) -> list[bool]:
        try:
            if self._closed:
                raise lmdb.Error("lmdb tier is closed")
            with self._env.begin(db=self._index.blocks, buffers=True) as txn:
                return [txn.get(k) is not None for k in keys]
        except lmdb.Error as e:
            raise StoreUnavailable(str(e)) from e

    def _read(self, keys: list[bytes]) -> list[bytes | memoryview | None]:
        txn = getattr(self._local, "txn", None)
        try:
            if txn is not None:  # inside get(): views into the map, valid until it ends
                return [txn.get(k) for k in keys]
            with self._env.begin(db=self._index.blocks) as own:
                return [own.get(k) for k in keys]
        except lmdb.Error as e:
            raise StoreUnavailable(str(e)) from e

    def _write(self, keys: list[bytes], values: list[bytes]) -> None:
        """Synchronous write of one batch (put() goes through the background writer)."""
        try:
            self._commit([("put", keys, values)])
        except lmdb.Error as e:
            raise StoreUnavailable(str(e)) from e

    def _remove(self, keys: list[bytes]) -> None:
        # Deletes are rare (explicit delete(), corrupt values): done at once so that a
        # deleted block is gone for the very next lookup, in this process and others.
        try:
            with self._env.begin(write=True) as txn:
                edit = self._index.edit(txn)
                for k in keys:
                    edit.remove(k)
                edit.save()
        except lmdb.Error as e:
            raise StoreUnavailable(str(e)) from e
        self._stats.set(used_bytes=edit.used)

    # --- the Tier interface -----------------------------------------------------------
    def get(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]) -> list[bool]:
        try:
            if self._closed:
                raise lmdb.Error("lmdb tier is closed")
            txn = self._env.begin(db=self._index.blocks, buffers=True)
        except lmdb.Error:
            self._stats.add(errors=1, misses=len(keys))
            return [False] * len(keys)
        self._local.txn = txn
        try:
            ok = super().get(keys, into)
        finally:
            self._local.txn = None
            txn.abort()
        hits = [k.to_bytes() for k, hit in zip(keys, ok) if hit]
        if hits:  # LRU touch; dropped silently under back-pressure (order gets a bit stale)
            self._writer.submit(("touch", hits, None), _TOUCH_COST * len(hits))
        return ok

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        keys, blocks = self._admitted(keys, blocks)
        if not keys:
            return
        # Encoding here (not in the writer) also snapshots the blocks: the caller may reuse
        # its buffers as soon as put() returns.
        values = [encode_block(k, b, self.codec) for k, b in zip(keys, blocks)]
        nbytes = sum(len(v) for v in values)
        if self._closed or not self._writer.submit(("put", [k.to_bytes() for k in keys], values), nbytes):
            self._stats.add(skipped_writes=len(keys))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every put() so far is committed (or dropped); False on timeout."""
        return self._writer.flush(timeout)

    def disk_usage(self) -> tuple[int, int]:
        """(bytes of stored values, stored blocks), as the persisted index counts them."""
        return self._index.usage()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        release_env(self.path)

    # --- admission and the writer -----------------------------------------------------
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

    def _apply_batch(self, ops: list[tuple]) -> None:
        start = time.perf_counter()
        blocks = sum(len(keys) for kind, keys, _ in ops if kind == "put")
        try:
            try:
                edit = self._commit(ops)
            except lmdb.MapFullError:
                # Free the oldest values in a transaction of their own (pages freed by a
                # committed transaction can be reused), then try the batch once more.
                incoming = sum(len(v) for kind, _, values in ops if kind == "put" for v in values)
                self._make_room(incoming + self.map_size // 8)
                edit = self._commit(ops)
        except lmdb.Error:  # still full, disk full, I/O error: skip this batch, count it
            self._stats.add(errors=1, skipped_writes=blocks)
            return
        self._stats.add(
            puts=blocks,
            bytes_written=edit.added_bytes,
            evictions=edit.evicted,
            write_seconds=time.perf_counter() - start,
        )
        self._stats.set(used_bytes=edit.used)

    def _commit(self, ops: list[tuple]):
        with self._env.begin(write=True) as txn:
            edit = self._index.edit(txn)
            for kind, keys, values in ops:
                if kind == "put":
                    for k, v in zip(keys, values):
                        edit.add(k, v)
                else:
                    for k in keys:
                        edit.touch(k)
            edit.evict_until(self.capacity_bytes)
            edit.save()
        return edit

    def _make_room(self, nbytes: int) -> None:
        try:
            with self._env.begin(write=True) as txn:
                edit = self._index.edit(txn)
                edit.evict_until(max(0, edit.used - nbytes))
                edit.save()
        except lmdb.Error:
            return  # even the eviction did not fit; the retry will fail and be counted
        self._stats.add(evictions=edit.evicted)
        self._stats.set(used_bytes=edit.used)
