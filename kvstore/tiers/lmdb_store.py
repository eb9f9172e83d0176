"""LmdbStore: bytes keys -> bytes values in one LMDB directory, with a persisted LRU index
and a byte budget. The `lmdb:` tier and the kv-server's persistence both use it, so both
keep the same on-disk format (lmdb_index.py) and the same eviction.

- Reads run under an LMDB read transaction: MVCC readers never wait for writers (not even
  another process's). `views()` lends zero-copy views into the memory map for the length
  of a `with` block; `read()` returns copies.
- write() is one write transaction: values, index and usage change together, then the
  least recently used values are evicted until usage <= capacity. The memory map is larger
  than the capacity (LMDB cannot reuse pages an open reader still sees); if it fills anyway,
  the oldest values are evicted in a transaction of their own and the write is tried once
  more. A write that still fails raises StoreUnavailable.
- LRU touches (touch(), after a hit) are only remembered here, up to `MAX_PENDING_TOUCHES`
  keys, and applied by the next write transaction before it evicts: eviction is the only
  reader of the order, so it sees every touch, and a reader never waits for LMDB's writer
  lock (held by this process's writer or another process's). flush() and close() apply
  them too, so another process sharing the directory sees them.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import lmdb

from kvtier.kvstore.tiers.byte_store import StoreUnavailable
from kvtier.kvstore.tiers.lmdb_envs import acquire_env, release_env
from kvtier.kvstore.tiers.lmdb_index import LruIndex

MAX_PENDING_TOUCHES = 1 << 16  # bounds the memory of touches waiting for a write


@dataclass
class WriteResult:
    added: int  # values newly stored (a key already present is only touched)
    added_bytes: int
    evicted: int  # values evicted by this write, including to make room in a full map
    used_bytes: int  # bytes of stored values after the write
    # Keys evicted to make room in a full map before the write, then by the write itself
    # (the write's may include keys it just added), for KV events.
    room_evicted_keys: list[bytes] = field(default_factory=list)
    evicted_keys: list[bytes] = field(default_factory=list)


class LmdbStore:
    def __init__(self, path: str, capacity_bytes: int, *, map_size: int | None = None, sync: bool = True):
        if not path:
            raise ValueError("lmdb store: needs a directory path")
        if capacity_bytes <= 0:
            raise ValueError(f"lmdb store: capacity must be positive, got {capacity_bytes}")
        self.path = os.path.abspath(os.path.expanduser(path))
        self.capacity_bytes = capacity_bytes
        # Twice the budget plus slack: pages freed by a transaction, or still seen by a
        # reader, cannot be reused at once, so the map runs ahead of the budget. The map is
        # only address space; the file grows as pages are used.
        self._env = acquire_env(self.path, map_size or 2 * capacity_bytes + (64 << 20), sync)
        try:
            self.map_size = self._env.info()["map_size"]  # another user here may have opened it
            self._index = LruIndex(self._env)
            self.used_bytes = self._index.used_bytes()
        except BaseException:
            release_env(self.path)
            raise
        self.evictions = 0  # values evicted by this process's writes
        self._touch_lock = threading.Lock()
        self._touches: dict[bytes, None] = {}  # insertion-ordered: oldest touch first
        self._closed = False

    # --- reads ----------------------------------------------------------------------------
    def _begin(self, **kwargs) -> lmdb.Transaction:
        if self._closed:
            raise StoreUnavailable("lmdb store is closed")
        try:
            return self._env.begin(db=self._index.blocks, **kwargs)
        except lmdb.Error as e:
            raise StoreUnavailable(str(e)) from e

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        with self._begin(buffers=True) as txn:
            try:
                return [txn.get(k) is not None for k in keys]
            except lmdb.Error as e:
                raise StoreUnavailable(str(e)) from e

    def read(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._begin() as txn:
            try:
                return [txn.get(k) for k in keys]
            except lmdb.Error as e:
                raise StoreUnavailable(str(e)) from e

    @contextlib.contextmanager
    def views(self, keys: Sequence[bytes]) -> Iterator[list[memoryview | None]]:
        """Views into the memory map (None where absent), valid only inside the block."""
        txn = self._begin(buffers=True)
        try:
            try:
                values = [txn.get(k) for k in keys]
            except lmdb.Error as e:
                raise StoreUnavailable(str(e)) from e
            yield values
        finally:
            txn.abort()

    def usage(self) -> tuple[int, int]:
        """(bytes of stored values, stored values), as the persisted index counts them."""
        if self._closed:
            raise StoreUnavailable("lmdb store is closed")
        return self._index.usage()

    # --- writes ---------------------------------------------------------------------------
    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark keys as just used; applied by the next write (see the module docstring)."""
        with self._touch_lock:
            for k in keys:
                self._touches.pop(k, None)
                if len(self._touches) < MAX_PENDING_TOUCHES:
                    self._touches[k] = None

    def write(self, keys: Sequence[bytes], values: Sequence[bytes]) -> WriteResult:
        """Store values in one transaction, then evict down to the capacity."""
        if self._closed:
            raise StoreUnavailable("lmdb store is closed")
        try:
            try:
                return self._commit(keys, values)
            except lmdb.MapFullError:
                room = self._make_room(sum(len(v) for v in values) + self.map_size // 8)
                result = self._commit(keys, values)
                result.evicted += len(room)
                result.room_evicted_keys = room
                return result
        except lmdb.Error as e:  # still full, disk full, I/O error
            raise StoreUnavailable(str(e)) from e

    def flush(self) -> None:
        """Apply pending touches now."""
        if self._touches and not self._closed:
            self.write([], [])

    def remove(self, keys: Sequence[bytes]) -> int:
        """Delete keys at once (a deleted block is gone for the very next read, in this
        process and others); returns how many were stored."""
        if self._closed:
            raise StoreUnavailable("lmdb store is closed")
        try:
            with self._env.begin(write=True) as txn:
                edit = self._index.edit(txn)
                removed = sum(edit.remove(k) for k in keys)
                edit.save()
        except lmdb.Error as e:
            raise StoreUnavailable(str(e)) from e
        self.used_bytes = edit.used
        return removed

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            release_env(self.path)

    def _take_touches(self) -> list[bytes]:
        with self._touch_lock:
            touches, self._touches = list(self._touches), {}
        return touches

    def _commit(self, keys: Sequence[bytes], values: Sequence[bytes]) -> WriteResult:
        touches = self._take_touches()
        try:
            with self._env.begin(write=True) as txn:
                edit = self._index.edit(txn)
                for k in touches:  # before eviction, so it sees them
                    edit.touch(k)
                for k, v in zip(keys, values):
                    edit.add(k, v)
                edit.evict_until(self.capacity_bytes)
                edit.save()
        except lmdb.Error:
            self.touch(touches)  # not applied: keep them for the next write
            raise
        self.used_bytes = edit.used
        self.evictions += edit.evicted
        return WriteResult(edit.added, edit.added_bytes, edit.evicted, edit.used, evicted_keys=edit.evicted_keys)

    def _make_room(self, nbytes: int) -> list[bytes]:
        """Evict the oldest values, in a transaction of their own, until `nbytes` fewer are
        stored (pages freed by a committed transaction can be reused); returns their keys."""
        try:
            with self._env.begin(write=True) as txn:
                edit = self._index.edit(txn)
                edit.evict_until(max(0, edit.used - nbytes))
                edit.save()
        except lmdb.Error:
            return []  # even the eviction did not fit; the retry fails and is reported
        self.used_bytes = edit.used
        self.evictions += edit.evicted
        return edit.evicted_keys
