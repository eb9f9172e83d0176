"""The kv-server's block store: an LRU over bytes in memory, optionally backed by LMDB.

Values are immutable `bytes`, so a reader takes a reference under the lock and streams it
after releasing it; no value is ever copied inside the lock. With persistence, every write
goes through to LMDB (an LmdbStore, the class the `lmdb:` tier stores into, so the disk
format, index and eviction are the same as the tier's) and memory is a cache over it: after
a restart memory is empty and reads fall through to disk, promoting what they find.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.kvstore.format.codec import CorruptBlock, parse_header, verify_value

if TYPE_CHECKING:
    from kvtier.kvstore.tiers.lmdb_store import LmdbStore

MAX_KEY_BYTES = 256


def value_problem(key: bytes, value: bytes) -> str | None:
    """Why `value` may not be stored under `key`, or None when it is an intact block value.

    The header's key digest is blake2b-128 of the raw key (codec.key_digest of a BlockKey is
    the same bytes), so a value stored under another key is refused here too.
    """
    try:
        verify_value(value)
        digest = parse_header(value)[3]
    except CorruptBlock as e:
        return str(e)
    if digest != hashlib.blake2b(key, digest_size=16).digest():
        return "value belongs to another key"
    return None


class BlockTooLarge(ValueError):
    """A value larger than the whole store (the server answers RESOURCE_EXHAUSTED)."""


@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    rejected: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class MemoryLRU:
    """Bytes values under a byte budget; the least recently used go first."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def get(self, key: bytes) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> int:
        """Store (replacing any old value); returns how many blocks were evicted."""
        self.pop(key)
        evicted = 0
        while self.used_bytes + len(value) > self.capacity_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.used_bytes -= len(old)
            evicted += 1
        self._items[key] = value
        self.used_bytes += len(value)
        return evicted

    def pop(self, key: bytes) -> bool:
        old = self._items.pop(key, None)
        if old is None:
            return False
        self.used_bytes -= len(old)
        return True


class BlockStore:
    """Thread-safe memory LRU plus an optional persistent LmdbStore behind it (whose
    operations raise StoreUnavailable for a disk fault)."""

    def __init__(self, capacity_bytes: int, persist: "LmdbStore | None" = None):
        self._memory = MemoryLRU(capacity_bytes)
        self._persist = persist
        self._lock = threading.Lock()
        # Writers to LMDB serialize on their own lock so memory readers never wait on disk.
        self._disk_lock = threading.Lock()
        self.counters = StoreCounters()

    @property
    def capacity_bytes(self) -> int:
        return self._memory.capacity_bytes

    @property
    def persistent(self) -> bool:
        return self._persist is not None

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            present = [k in self._memory for k in keys]
        if self._persist is not None and not all(present):
            missing = [i for i, p in enumerate(present) if not p]
            for i, found in zip(missing, self._persist.exists([keys[i] for i in missing])):
                present[i] = found
        return present

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            values = [self._memory.get(k) for k in keys]
        if self._persist is not None and any(v is None for v in values):
            missing = [i for i, v in enumerate(values) if v is None]
            found = self._persist.read([keys[i] for i in missing])
            promoted = [(keys[i], bytes(v)) for i, v in zip(missing, found) if v is not None]
            if promoted:  # a disk hit is a use: keep it out of the disk's eviction for longer
                self._persist.touch([k for k, _ in promoted])
            with self._lock:
                for key, value in promoted:
                    if len(value) <= self._memory.capacity_bytes:
                        self.counters.evictions += self._memory.put(key, value)
            by_key = dict(promoted)
            for i in missing:
                values[i] = by_key.get(keys[i])
        with self._lock:
            c = self.counters
            for v in values:
                if v is None:
                    c.misses += 1
                else:
                    c.hits += 1
                    c.bytes_read += len(v)
        return values

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Store verified values; BlockTooLarge (storing nothing) if one exceeds capacity."""
        for v in values:
            if len(v) > self._memory.capacity_bytes:
                raise BlockTooLarge(f"a {len(v)}-byte block exceeds the {self._memory.capacity_bytes}-byte capacity")
        if self._persist is not None:
            with self._disk_lock:
                self._persist.write(list(keys), list(values))
        with self._lock:
            for key, value in zip(keys, values):
                self.counters.evictions += self._memory.put(key, value)
                self.counters.bytes_written += len(value)
            self.counters.puts += len(keys)

    def delete(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            deleted = sum(self._memory.pop(k) for k in keys)
        if self._persist is not None:
            with self._disk_lock:
                on_disk = self._persist.remove(list(keys))
            deleted = max(deleted, on_disk)
        return deleted

    def reject(self, n: int = 1) -> None:
        with self._lock:
            self.counters.rejected += n

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self.counters.__dict__)
            out.update(used_bytes=self._memory.used_bytes, blocks=len(self._memory))
        if self._persist is not None:
            out["disk_bytes"], out["disk_blocks"] = self._persist.usage()
        return out

    def close(self) -> None:
        if self._persist is not None:
            self._persist.close()


class PutBatch:
    """Verified blocks of one Put (gRPC stream or bulk connection) on their way to the store,
    in batches: one LMDB transaction per batch, not per block."""

    FLUSH_BYTES = 64 << 20
    FLUSH_BLOCKS = 256

    def __init__(self, store: BlockStore):
        self._store = store
        self._keys: list[bytes] = []
        self._values: list = []
        self._bytes = 0
        self.stored = 0  # blocks handed to the store so far

    @property
    def pending(self) -> int:
        return len(self._keys)

    def add(self, key: bytes, value) -> None:
        """Queue one verified block; may flush (StoreUnavailable from a failed disk write)."""
        self._keys.append(key)
        self._values.append(value)
        self._bytes += len(value)
        if self._bytes >= self.FLUSH_BYTES or len(self._keys) >= self.FLUSH_BLOCKS:
            self.flush()

    def flush(self) -> None:
        """Store what is queued. On StoreUnavailable the queued blocks are dropped, not
        counted as stored, and the error propagates."""
        if not self._keys:
            return
        keys, values = self._keys, self._values
        self._keys, self._values, self._bytes = [], [], 0
        self._store.put_many(keys, values)
        self.stored += len(keys)

    def take_stored(self) -> int:
        """Blocks stored since the last call."""
        stored, self.stored = self.stored, 0
        return stored
