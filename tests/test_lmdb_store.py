"""LmdbStore, the public LMDB store the `lmdb:` tier and the kv-server share: the server's
BlockStore keeps data across a restart, a directory written by either side is read by the
other, the on-disk format is the persisted one, a full map is an error the caller sees."""
import hashlib
import struct

import lmdb
import pytest
import torch

from kvtier.kvstore.format.codec import encode_block
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.server.store import BlockStore
from kvtier.kvstore.tiers.byte_store import StoreUnavailable
from kvtier.kvstore.tiers.lmdb_store import LmdbStore
from kvtier.kvstore.tiers.lmdb_tier import LmdbTier

SHAPE = (2, 2, 4, 2, 8)


def key(i: int) -> BlockKey:
    return BlockKey(b"model-a", hashlib.sha256(str(i).encode()).digest())


def block(i: int) -> torch.Tensor:
    return torch.arange(256, dtype=torch.float32).view(SHAPE) + 1000 * i


def value(i: int) -> bytes:
    return encode_block(key(i), block(i))


def test_the_servers_block_store_keeps_data_across_a_restart(tmp_path):
    path = str(tmp_path / "kv")
    store = BlockStore(1 << 20, LmdbStore(path, 1 << 20))
    store.put_many([key(i).to_bytes() for i in range(4)], [value(i) for i in range(4)])
    assert store.delete([key(3).to_bytes()]) == 1
    store.close()

    store = BlockStore(1 << 20, LmdbStore(path, 1 << 20))  # a restarted server: memory empty
    try:
        snap = store.snapshot()
        assert (snap["blocks"], snap["disk_blocks"], snap["disk_bytes"]) == (0, 3, 3 * len(value(0)))
        assert store.contains([key(i).to_bytes() for i in range(4)]) == [True, True, True, False]
        assert store.get_many([key(i).to_bytes() for i in range(4)]) == [value(0), value(1), value(2), None]
        assert store.snapshot()["blocks"] == 3  # promoted into memory
    finally:
        store.close()


def test_a_directory_is_shared_by_the_tier_and_the_server_in_both_directions(tmp_path):
    path = str(tmp_path / "kv")
    tier = LmdbTier(path, 1 << 20)
    tier.put([key(0)], [block(0)])
    tier.close()
    store = BlockStore(1 << 20, LmdbStore(path, 1 << 20))
    assert store.get_many([key(0).to_bytes()]) == [value(0)]
    store.put_many([key(1).to_bytes()], [value(1)])
    store.close()
    tier = LmdbTier(path, 1 << 20)
    try:
        out = [torch.zeros(SHAPE) for _ in range(2)]
        assert tier.get([key(0), key(1)], out) == [True, True] and torch.equal(out[1], block(1))
    finally:
        tier.close()


def test_reads_and_evicts_a_directory_in_the_persisted_format(tmp_path):
    """Written here with plain py-lmdb in the layout lmdb_index.py documents, so a change to
    that format (which would orphan existing directories) fails this test."""
    path = str(tmp_path / "kv")
    env = lmdb.open(path, max_dbs=4, map_size=16 << 20)
    blocks, meta, order = (env.open_db(name) for name in (b"blocks", b"meta", b"order"))
    with env.begin(write=True) as txn:
        for counter, i in enumerate([2, 0, 1]):  # access order: 2 is least recently used
            raw, v = key(i).to_bytes(), value(i)
            txn.put(raw, v, db=blocks)
            txn.put(raw, struct.pack("<QQ", counter, len(v)), db=meta)
            txn.put(struct.pack(">Q", counter), raw, db=order)
        txn.put(b"!state", struct.pack("<QQ", 3, 3 * len(value(0))), db=meta)
    env.close()

    store = LmdbStore(path, 3 * len(value(0)))
    try:
        assert store.usage() == (3 * len(value(0)), 3)
        assert store.read([key(0).to_bytes(), key(9).to_bytes()]) == [value(0), None]
        store.write([key(3).to_bytes()], [value(3)])  # over budget: the oldest (2) goes
        assert store.exists([key(i).to_bytes() for i in range(4)]) == [True, True, False, True]
        assert store.evictions == 1
    finally:
        store.close()


def test_a_write_that_cannot_fit_the_map_raises_and_the_store_keeps_working(tmp_path):
    store = LmdbStore(str(tmp_path / "kv"), 1 << 30, map_size=256 << 10)
    try:
        with pytest.raises(StoreUnavailable):
            store.write([b"big"], [b"x" * (1 << 20)])
        store.write([key(0).to_bytes()], [value(0)])
        assert store.read([key(0).to_bytes()]) == [value(0)]
        assert store.remove([key(0).to_bytes(), key(1).to_bytes()]) == 1
    finally:
        store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.read([key(0).to_bytes()])


@pytest.mark.parametrize("path, capacity, message", [("", 1, "directory"), ("x", 0, "positive")])
def test_bad_arguments(tmp_path, path, capacity, message):
    with pytest.raises(ValueError, match=message):
        LmdbStore(path and str(tmp_path / path), capacity)
