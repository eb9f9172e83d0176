"""The LMDB tier on a real LMDB directory: round trips, LRU eviction, admission, corruption
on disk, a full map, back-pressure through the hierarchy's writer, LRU touches that never
block a reader, bad specs, and restarts / sharing across real processes."""
import hashlib
import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvtier.kvstore.format.codec import HEADER_BYTES, encode_block
from kvtier.kvstore.hierarchy import TierHierarchy
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.lmdb_tier import LmdbTier
from kvtier.kvstore.tiers.spec import BlockLayout, build_tier, parse_tier_spec

SHAPE = (2, 2, 4, 2, 8)  # 256 float32 = 1 KiB of payload
VALUE_BYTES = HEADER_BYTES + 1024
LAYOUT = BlockLayout(SHAPE, torch.float32, torch.device("cpu"))


def key(i: int, ns: bytes = b"model-a") -> BlockKey:
    return BlockKey(ns, hashlib.sha256(str(i).encode()).digest())


def block(i: int, shape=SHAPE) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + 1000 * i


def fetch(tier, idx, shape=SHAPE):
    out = [torch.zeros(shape) for _ in idx]
    ok = tier.get([key(i) for i in idx], out)
    return ok, out


def present(tier, idx) -> list[bool]:
    return tier.contains([key(i) for i in idx])


@pytest.fixture
def tier(tmp_path):
    t = LmdbTier(str(tmp_path / "kv"), 1 << 30)
    yield t
    t.close()


def test_round_trip_prefix_and_delete(tier):
    tier.put([key(i) for i in range(5)], [block(i) for i in range(5)])
    assert tier.flush(timeout=10)
    assert tier.lookup_prefix([key(i) for i in range(8)]) == 5
    assert tier.lookup_prefix([key(9)] + [key(i) for i in range(5)]) == 0
    ok, out = fetch(tier, [0, 4, 7])
    assert ok == [True, True, False]
    assert torch.equal(out[0], block(0)) and torch.equal(out[1], block(4))
    tier.delete([key(0), key(42)])
    assert present(tier, [0, 1]) == [False, True]
    s = tier.stats()
    assert (s.hits, s.misses, s.puts, s.errors) == (2, 1, 5, 0)
    assert s.used_bytes == 4 * VALUE_BYTES and s.bytes_read == 2 * VALUE_BYTES


def test_put_is_idempotent_and_fp8_spec(tmp_path):
    t = build_tier(f"lmdb:{tmp_path}/fp8?size=1MiB&codec=fp8&sync=0", LAYOUT)
    try:
        x = torch.randn(SHAPE)
        t.put([key(1)], [x])
        t.put([key(1)], [x])
        t.flush()
        ok, out = fetch(t, [1])
        assert ok == [True] and (out[0] - x).abs().max() <= 2**-4 * x.abs().max()
        s = t.stats()
        assert s.used_bytes == s.bytes_written < VALUE_BYTES / 3  # stored once, fp8-sized
        assert t.capacity_bytes == 1 << 20
    finally:
        t.close()


def test_lru_eviction_keeps_usage_under_size(tmp_path):
    t = LmdbTier(str(tmp_path / "kv"), 5 * VALUE_BYTES)
    try:
        for i in range(5):
            t.put([key(i)], [block(i)])
        t.flush()
        assert fetch(t, [0])[0] == [True]  # 0 becomes the most recently used
        t.flush()
        t.put([key(5), key(6)], [block(5), block(6)])
        t.flush()
        assert present(t, range(7)) == [True, False, False, True, True, True, True]
        s = t.stats()
        assert s.evictions == 2 and s.used_bytes == 5 * VALUE_BYTES <= t.capacity_bytes
    finally:
        t.close()


def test_admission_writes_only_blocks_seen_twice(tmp_path):
    t = build_tier(f"lmdb:{tmp_path}/kv?admit=2", LAYOUT)
    try:
        t.put([key(0), key(1)], [block(0), block(1)])
        t.flush()
        assert present(t, [0, 1]) == [False, False]
        t.put([key(1)], [block(1)])
        t.flush()
        assert present(t, [0, 1]) == [False, True]
        assert t.stats().skipped_writes == 2 and t.stats().puts == 1
    finally:
        t.close()


def test_corrupt_value_on_disk_is_a_counted_deleted_miss(tmp_path):
    path = str(tmp_path / "kv")
    t = LmdbTier(path, 1 << 30)
    marker = torch.full(SHAPE, 1234.5678)
    t.put([key(0), key(1)], [marker, block(1)])
    t.close()
    # Flip one payload byte in the data file itself, as bit rot or a torn write would.
    data_file = os.path.join(path, "data.mdb")
    raw = bytearray(open(data_file, "rb").read())
    at = raw.find(encode_block(key(0), marker)[HEADER_BYTES:][:64])
    assert at > 0
    raw[at + 17] ^= 0x01
    open(data_file, "wb").write(raw)

    t = LmdbTier(path, 1 << 30)
    try:
        ok, out = fetch(t, [0, 1])
        assert ok == [False, True] and torch.equal(out[1], block(1))
        assert present(t, [0, 1]) == [False, True]  # the corrupt value was deleted
        assert t.stats().errors == 1 and t.stats().used_bytes == VALUE_BYTES
    finally:
        t.close()


def test_full_map_never_raises_and_recovers(tmp_path):
    shape = (4, 2, 16, 4, 16)  # 32 KiB blocks, a 512 KiB map, a budget far above it
    t = LmdbTier(str(tmp_path / "kv"), 1 << 30, map_size=512 << 10)
    try:
        for i in range(40):
            t.put([key(i)], [block(i, shape)])
            t.flush()
        s = t.stats()
        assert s.evictions > 0  # room was made by evicting the oldest
        assert fetch(t, [39], shape)[0] == [True]
        assert torch.equal(fetch(t, [39], shape)[1][0], block(39, shape))
        # A block bigger than the whole map cannot fit: skipped and counted, not raised.
        big = (8, 2, 64, 8, 16)
        t.put([key(100)], [block(100, big)])
        t.flush()
        assert t.stats().skipped_writes >= 1 and present(t, [100]) == [False]
        t.put([key(41)], [block(41, shape)])  # and the tier keeps working
        t.flush()
        assert present(t, [41]) == [True]
    finally:
        t.close()


def test_put_and_get_never_block_on_a_stalled_writer(tmp_path):
    """Under the hierarchy, the tier's one writer is bounded by its `queue=` option in bytes."""
    t = build_tier(f"lmdb:{tmp_path}/kv?queue=4KiB", LAYOUT)
    h = TierHierarchy([t])
    try:
        t.put([key(99)], [block(99)])
        holder = t.store._env.begin(write=True)  # hold LMDB's writer lock: the writer stalls
        try:
            start = time.perf_counter()
            for i in range(50):
                h.store([key(i)], [block(i)])
            ok, out = fetch(t, [99])  # readers do not wait for writers
            assert time.perf_counter() - start < 1.0
            assert ok == [True] and torch.equal(out[0], block(99))
            assert 0 < h.stats()["lmdb"].skipped_writes <= 50 - 4  # ~4 blocks fit in 4 KiB
        finally:
            holder.abort()
        assert h.flush(timeout=10)
        s = h.stats()["lmdb"]
        assert s.puts + s.skipped_writes == 51
        assert sum(present(t, range(50))) == s.puts - 1
    finally:
        h.close()


def test_hits_never_wait_for_the_writer_lock_and_their_touches_steer_eviction(tmp_path):
    t = LmdbTier(str(tmp_path / "kv"), 3 * VALUE_BYTES)
    try:
        t.put([key(i) for i in range(3)], [block(i) for i in range(3)])
        holder = t.store._env.begin(write=True)  # another writer holds the lock
        try:
            start = time.perf_counter()
            assert fetch(t, [0])[0] == [True]  # a hit: 0 becomes the most recently used
            assert time.perf_counter() - start < 0.5
        finally:
            holder.abort()
        t.put([key(3)], [block(3)])  # the touch is applied before this write evicts
        assert present(t, range(4)) == [True, False, True, True]
    finally:
        t.close()


def test_pending_touches_are_bounded(tmp_path, monkeypatch):
    import kvtier.kvstore.tiers.lmdb_store as lmdb_store

    monkeypatch.setattr(lmdb_store, "MAX_PENDING_TOUCHES", 4)
    t = LmdbTier(str(tmp_path / "kv"), 1 << 20)
    try:
        t.put([key(i) for i in range(10)], [block(i) for i in range(10)])
        assert fetch(t, range(10))[0] == [True] * 10
        assert len(t.store._touches) == 4
        assert t.flush() and len(t.store._touches) == 4  # flush adds no commit of its own
        t.put([key(10)], [block(10)])  # the next write applies them
        assert len(t.store._touches) == 0
    finally:
        t.close()


def test_closed_tier_answers_misses(tmp_path):
    t = LmdbTier(str(tmp_path / "kv"), 1 << 30)
    t.put([key(0)], [block(0)])
    t.close()
    t.put([key(1)], [block(1)])
    assert fetch(t, [0])[0] == [False] and t.lookup_prefix([key(0)]) == 0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lmdb:", "needs a directory"),
        ("lmdb:?size=1GiB", "needs a directory"),
        ("ldmb:/tmp/x", "unknown tier"),
        ("lmdb:/tmp/x?size=lots", "cannot parse"),
        ("lmdb:/tmp/x?size=0", "must be positive"),
        ("lmdb:/tmp/x?admit=0", "admit must be >= 1"),
        ("lmdb:/tmp/x?admit=two", "not an integer"),
        ("lmdb:/tmp/x?codec=zstd", "unknown 'zstd'"),
        ("lmdb:/tmp/x?sync=maybe", "not a boolean"),
        ("lmdb:/tmp/x?ttl=5", "unknown option"),
    ],
)
def test_bad_specs_fail_fast(tmp_path, spec, message):
    spec = spec.replace("/tmp/x", str(tmp_path / "x"))
    with pytest.raises(ValueError, match=message):
        build_tier(parse_tier_spec(spec), LAYOUT)
    assert not os.path.exists(tmp_path / "x")  # nothing created for a bad spec


# --- across processes ------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import hashlib, os, sys, time, torch
    from kvtier.kvstore.keys import BlockKey
    from kvtier.kvstore.tiers.lmdb_tier import LmdbTier
    path, capacity, first, last, touch, barrier = sys.argv[1:7]
    capacity, first, last = int(capacity), int(first), int(last)
    key = lambda i: BlockKey(b"model-a", hashlib.sha256(str(i).encode()).digest())
    block = lambda i: torch.arange(256, dtype=torch.float32).view(2, 2, 4, 2, 8) + 1000 * i
    t = LmdbTier(path, capacity)
    if barrier:  # start writing together with the other process
        open(barrier + "." + str(os.getpid()), "w").close()
        while not os.path.exists(barrier):
            time.sleep(0.005)
    for i in range(first, last):
        t.put([key(i)], [block(i)])
        t.flush()  # one commit per block: the two writers interleave
        assert t.get([key(i)], [torch.empty(2, 2, 4, 2, 8)]) == [True]
    for i in [int(x) for x in touch.split(",") if x]:
        assert t.get([key(i)], [torch.empty(2, 2, 4, 2, 8)]) == [True]
    t.close()
    """
)


def run_child(path, capacity, first, last, touch="", barrier=""):
    args = [path, str(capacity), str(first), str(last), touch, barrier]
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args])


def test_warm_restart_in_another_process_keeps_hits_usage_and_lru(tmp_path):
    path = str(tmp_path / "kv")
    assert run_child(path, 6 * VALUE_BYTES, 0, 6, touch="0,1").wait(60) == 0
    t = LmdbTier(path, 6 * VALUE_BYTES)
    try:
        assert t.stats().used_bytes == 6 * VALUE_BYTES  # usage persisted
        ok, out = fetch(t, range(6))
        assert ok == [True] * 6 and torch.equal(out[3], block(3))
        # LRU order persisted: process A touched 0 and 1 last, our gets just touched all
        # of 0..5 in order, so the oldest are now 0, 1, 2.
        t.flush()
        t.put([key(6), key(7), key(8)], [block(6), block(7), block(8)])
        t.flush()
        assert present(t, range(9)) == [False] * 3 + [True] * 6
    finally:
        t.close()


def test_lru_order_from_another_process_decides_eviction(tmp_path):
    path = str(tmp_path / "kv")
    assert run_child(path, 4 * VALUE_BYTES, 0, 4, touch="0").wait(60) == 0
    t = LmdbTier(path, 4 * VALUE_BYTES)
    try:
        t.put([key(10)], [block(10)])
        t.flush()
        assert present(t, [0, 1, 2, 3, 10]) == [True, False, True, True, True]
    finally:
        t.close()


def test_two_processes_share_one_directory(tmp_path):
    path = str(tmp_path / "kv")
    capacity = 40 * VALUE_BYTES  # small enough that both processes evict while writing
    barrier = str(tmp_path / "go")
    children = [run_child(path, capacity, 0, 60, barrier=barrier), run_child(path, capacity, 30, 90, barrier=barrier)]
    deadline = time.monotonic() + 60
    while len([f for f in os.listdir(tmp_path) if f.startswith("go.")]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    open(barrier, "w").close()
    assert [c.wait(120) for c in children] == [0, 0]
    t = LmdbTier(path, capacity)
    try:
        # The persisted index agrees with what is stored, and usage respects the budget.
        index = t.store._index
        with t.store._env.begin() as txn:
            sizes = [len(v) for _, v in txn.cursor(db=index.blocks)]
            meta = {k: struct.unpack("<QQ", v) for k, v in txn.cursor(db=index.meta) if len(k) == 41}
            order = [v for _, v in txn.cursor(db=index.order)]
        assert len(sizes) == len(meta) == len(order) == 40
        assert sorted(order) == sorted(meta) and sum(sizes) == t.stats().used_bytes <= capacity
        newest = [i for i in range(90) if t.contains([key(i)])[0]]
        assert len(newest) == 40 and all(torch.equal(fetch(t, [i])[1][0], block(i)) for i in newest)
    finally:
        t.close()
