"""The LMDB tier's persisted LRU index: what is stored, in what access order, how many bytes.

It lives in the same LMDB environment as the values and changes in the same write
transactions, so it survives restarts, never disagrees with the values after a crash, and
stays right when several processes share one directory (LMDB serializes their writers; each
reads the counters inside its own write transaction). Three named databases:

    blocks: key -> value (header + payload)
    meta:   key -> (access counter, value bytes);  b"!state" -> (next counter, used bytes)
    order:  big-endian access counter -> key   (first entry = least recently used)

The state key is shorter than every 41-byte block key, so the two never collide.
"""
from __future__ import annotations

import struct

import lmdb

_STATE_KEY = b"!state"
_PAIR = struct.Struct("<QQ")  # meta values and the state record
_COUNTER = struct.Struct(">Q")  # big-endian, so LMDB's byte order is access order


class LruIndex:
    def __init__(self, env: lmdb.Environment):
        self.env = env
        # Opening (creating) named databases needs a write transaction, once per process.
        self.blocks = env.open_db(b"blocks")
        self.meta = env.open_db(b"meta")
        self.order = env.open_db(b"order")

    def used_bytes(self) -> int:
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(_STATE_KEY)
        return _PAIR.unpack(raw)[1] if raw else 0

    def usage(self) -> tuple[int, int]:
        """(bytes of stored values, number of stored blocks)."""
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(_STATE_KEY)
            blocks = txn.stat(self.blocks)["entries"]
        return (_PAIR.unpack(raw)[1] if raw else 0), blocks

    def edit(self, txn: lmdb.Transaction) -> "IndexEdit":
        return IndexEdit(self, txn)


class IndexEdit:
    """LRU bookkeeping inside one write transaction; call save() before it commits."""

    def __init__(self, index: LruIndex, txn: lmdb.Transaction):
        self.ix = index
        self.txn = txn
        raw = txn.get(_STATE_KEY, db=index.meta)
        self.next_counter, self.used = _PAIR.unpack(raw) if raw else (0, 0)
        self.added = 0  # values newly stored in this transaction
        self.added_bytes = 0
        self.evicted = 0
        self.evicted_keys: list[bytes] = []  # in eviction order, for KV events

    def _stamp(self, key: bytes, size: int) -> None:
        """Give `key` the newest access counter."""
        self.txn.put(key, _PAIR.pack(self.next_counter, size), db=self.ix.meta)
        self.txn.put(_COUNTER.pack(self.next_counter), key, db=self.ix.order)
        self.next_counter += 1

    def touch(self, key: bytes) -> bool:
        raw = self.txn.get(key, db=self.ix.meta)
        if raw is None:
            return False
        counter, size = _PAIR.unpack(raw)
        self.txn.delete(_COUNTER.pack(counter), db=self.ix.order)
        self._stamp(key, size)
        return True

    def add(self, key: bytes, value: bytes) -> None:
        """Store a value; an already stored key (content-addressed, so equal) is only touched."""
        if self.touch(key):
            return
        self.txn.put(key, value, db=self.ix.blocks)
        self._stamp(key, len(value))
        self.used += len(value)
        self.added += 1
        self.added_bytes += len(value)

    def remove(self, key: bytes) -> bool:
        raw = self.txn.get(key, db=self.ix.meta)
        self.txn.delete(key, db=self.ix.blocks)
        if raw is None:
            return False
        counter, size = _PAIR.unpack(raw)
        self.txn.delete(_COUNTER.pack(counter), db=self.ix.order)
        self.txn.delete(key, db=self.ix.meta)
        self.used -= min(size, self.used)
        return True

    def evict_until(self, limit: int) -> int:
        """Drop least recently used values until at most `limit` bytes are stored."""
        n = 0
        cursor = self.txn.cursor(db=self.ix.order)
        while self.used > limit and cursor.first():
            key = bytes(cursor.value())
            self.evicted_keys.append(key)
            cursor.delete()
            raw = self.txn.get(key, db=self.ix.meta)
            self.txn.delete(key, db=self.ix.blocks)
            if raw is not None:
                self.txn.delete(key, db=self.ix.meta)
                self.used -= min(_PAIR.unpack(raw)[1], self.used)
            n += 1
        if self.used > limit:  # order empty but usage says otherwise: trust the order
            self.used = 0
        self.evicted += n
        return n

    def save(self) -> None:
        self.txn.put(_STATE_KEY, _PAIR.pack(self.next_counter, self.used), db=self.ix.meta)
