"""TierHierarchy: lookup across tiers, load fallback and promotion, write policies,
back-pressure, fault containment; and the codec's rejection of any flipped byte."""
import hashlib
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.kvstore.tiers.byte_store import ByteStoreTier
from kvtier.kvstore.format.codec import CorruptBlock, decode_block, encode_block
from kvtier.kvstore.tiers.cpu_tier import CpuTier
from kvtier.kvstore.hierarchy import TierHierarchy
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.background_writer import WriterLimits
from kvtier.kvstore.tiers.base import Tier
from kvtier.kvstore.tiers.spec import BlockLayout

LAYOUT = BlockLayout(shape=(2, 2, 4, 2, 8), dtype=torch.float32, device=torch.device("cpu"))
BLOCK = LAYOUT.nbytes


def key(i: int) -> BlockKey:
    return BlockKey(b"testns", hashlib.sha256(str(i).encode()).digest())


def block(i: int) -> torch.Tensor:
    return torch.arange(LAYOUT.nbytes // 4, dtype=torch.float32).view(LAYOUT.shape) + 1000.0 * i


def keys(ids):
    return [key(i) for i in ids]


def blocks(ids):
    return [block(i) for i in ids]


class DictTier(ByteStoreTier):
    """A real byte store in a dict (encoded, checksummed values via ByteStoreTier). `gate`
    makes writes wait (a slow disk); `corrupt` flips a byte of a stored value."""

    def __init__(self, name="dict", gate: threading.Event | None = None):
        super().__init__(1 << 30)
        self.name, self.gate, self.values, self.writes = name, gate, {}, 0
        self.entered = threading.Event()  # a write has started

    def _exists(self, ks):
        return [k in self.values for k in ks]

    def _read(self, ks):
        return [self.values.get(k) for k in ks]

    def _write(self, ks, vs):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.values.update(zip(ks, vs))
        self.writes += 1

    def _remove(self, ks):
        for k in ks:
            self.values.pop(k, None)

    def corrupt(self, k: BlockKey, pos: int = -1):
        raw = bytearray(self.values[k.to_bytes()])
        raw[pos] ^= 0xFF
        self.values[k.to_bytes()] = bytes(raw)

    def held(self, ids):
        return self.contains(keys(ids))


class FaultyTier(Tier):
    """Raises from every call (a tier with a bug), the first `failures` puts at least."""

    name = "faulty"

    def __init__(self, failures=10**9):
        super().__init__(1 << 20)
        self.failures, self.stored = failures, {}

    def lookup_prefix(self, ks):
        raise RuntimeError("boom")

    def contains(self, ks):
        raise RuntimeError("boom")

    def get(self, ks, into):
        raise RuntimeError("boom")

    def put(self, ks, bs):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("boom")
        self.stored.update(zip(ks, bs))

    def delete(self, ks):
        raise RuntimeError("boom")


def cpu(slots: int) -> CpuTier:
    return CpuTier(slots * BLOCK, LAYOUT)


def load_ids(h: TierHierarchy, ids, locations):
    into = [torch.zeros(LAYOUT.shape) for _ in ids]
    return h.load(keys(ids), into, locations), into


def test_write_through_reaches_all_tiers_after_flush():
    top, mid, low = cpu(8), DictTier("lmdb"), DictTier("redis")
    h = TierHierarchy([top, mid, low])
    h.store(keys(range(5)), blocks(range(5)))
    assert top.contains(keys(range(5))) == [True] * 5  # tier 0 is synchronous
    assert h.flush(timeout=5)
    assert mid.held(range(5)) == low.held(range(5)) == [True] * 5
    h.close()


def test_a_byte_store_on_top_is_written_in_the_background_too():
    top, low = DictTier("top"), DictTier("low")
    h = TierHierarchy([top, low])
    h.store(keys(range(3)), blocks(range(3)))
    assert h.flush(timeout=5)
    assert top.held(range(3)) == low.held(range(3)) == [True] * 3
    h.close()


def test_flush_also_waits_for_a_tiers_own_write_queue(tmp_path):
    from kvtier.kvstore.tiers.spec import build_tier

    disk = build_tier(f"lmdb:{tmp_path}?size=1MiB", LAYOUT)  # written on the hierarchy's writer
    h = TierHierarchy([cpu(4), disk])
    h.store(keys(range(4)), blocks(range(4)))
    assert h.flush(timeout=10)
    assert disk.contains(keys(range(4))) == [True] * 4
    assert h.lookup(keys(range(4))) == [0] * 4
    h.close()


def test_write_back_writes_lower_tier_only_on_eviction():
    top, low = cpu(2), DictTier()
    h = TierHierarchy([top, low], write_policy="write-back")
    h.store(keys([0, 1]), blocks([0, 1]))
    h.flush(timeout=5)
    assert low.values == {}
    h.store(keys([2]), blocks([2]))  # evicts 0 from the cpu tier
    h.flush(timeout=5)
    assert low.held([0, 1, 2]) == [True, False, False]
    assert h.lookup(keys([0, 1, 2])) == [1, 0, 0]
    ok, into = load_ids(h, [0], [1])
    assert ok == [True] and torch.equal(into[0], block(0))
    h.close()


def test_write_back_cascades_down_several_tiers():
    a, b, c = cpu(2), cpu(2), DictTier()
    h = TierHierarchy([a, b, c], write_policy="write-back")
    for i in range(6):
        h.store(keys([i]), blocks([i]))
        h.flush(timeout=5)
    assert h.lookup(keys(range(6))) == [2, 2, 1, 1, 0, 0]
    assert h.names == ["cpu0", "cpu1", "dict"] and set(h.stats()) == {"cpu0", "cpu1", "dict"}
    h.close()


def test_lookup_longest_prefix_fastest_tier_and_no_side_effects():
    top, low = cpu(4), DictTier()
    top.put(keys([0, 1, 5]), blocks([0, 1, 5]))
    low.put(keys([1, 2, 3]), blocks([1, 2, 3]))
    h = TierHierarchy([top, low])
    order = top.keys_lru()
    assert h.lookup(keys(range(6))) == [0, 0, 1, 1]  # block 4 is nowhere: 5 does not count
    assert h.lookup(keys([4, 0])) == []
    assert h.lookup([]) == []
    assert top.keys_lru() == order  # lookup did not refresh LRU
    assert top.stats().hits == low.stats().hits == 0
    h.close()


def test_load_falls_back_when_upper_tier_corrupts_a_block():
    upper, lower = DictTier("upper"), DictTier("lower")
    for t in (upper, lower):
        t.put(keys(range(3)), blocks(range(3)))
    upper.corrupt(key(1))
    h = TierHierarchy([upper, lower])
    ok, into = load_ids(h, [0, 1, 2], [0, 0, 0])
    assert ok == [True] * 3
    assert all(torch.equal(x, block(i)) for x, i in zip(into, range(3)))
    assert h.stats()["upper"].errors == 1  # counted, and the corrupt value was dropped
    assert h.flush(timeout=5)  # promotion (queued: the upper tier is not host memory) repairs it
    ok, into = load_ids(h, [1], [0])
    assert ok == [True] and torch.equal(into[0], block(1)) and h.stats()["lower"].hits == 1
    h.close()


def test_load_survives_a_raising_tier_and_reports_misses():
    low = DictTier()
    low.put(keys([0]), blocks([0]))
    h = TierHierarchy([cpu(4), FaultyTier(), low])
    assert h.lookup(keys([0, 1])) == [2]
    ok, into = load_ids(h, [0, 1], [1, 1])  # stale locations: tier 1 raises, tier 2 has only 0
    assert ok == [True, False] and torch.equal(into[0], block(0))
    assert h.stats()["faulty"].errors >= 2
    with pytest.raises(ValueError, match="location"):
        load_ids(h, [0], [3])
    h.close()


def test_promotion_moves_lower_tier_hits_up():
    top, mid, low = cpu(4), DictTier("mid"), DictTier("low")
    low.put(keys([0, 1]), blocks([0, 1]))
    h = TierHierarchy([top, mid, low])
    ok, _ = load_ids(h, [0, 1], h.lookup(keys([0, 1])))
    assert ok == [True, True]
    assert top.contains(keys([0, 1])) == [True, True]  # inline into tier 0
    h.flush(timeout=5)
    assert mid.held([0, 1]) == [True, True]  # write-through: the tier in between too
    assert h.lookup(keys([0, 1])) == [0, 0]
    ok, into = load_ids(h, [1], [0])
    assert ok == [True] and torch.equal(into[0], block(1))
    h.close()


def test_full_queue_drops_and_counts_instead_of_blocking():
    gate = threading.Event()
    slow = DictTier("slow", gate=gate)
    h = TierHierarchy([cpu(64), slow], writer=WriterLimits(queue_bytes=4 * BLOCK))
    h.store(keys([0]), blocks([0]))
    assert slow.entered.wait(5)  # the writer is now stuck in the slow tier
    assert not h.flush(timeout=0.05)
    done = threading.Event()

    def engine_loop():
        for i in range(1, 11):
            h.store(keys([i]), blocks([i]))
        done.set()

    threading.Thread(target=engine_loop, daemon=True).start()
    assert done.wait(5), "store() blocked on a slow tier"
    assert h.stats()["slow"].skipped_writes == 6  # 4 queued behind the stuck write, 6 dropped
    gate.set()
    assert h.flush(timeout=5)
    assert slow.held(range(11)) == [True] * 5 + [False] * 6
    assert slow.writes == 2  # the queued blocks went down in one batched put
    h.close()


def test_writer_thread_survives_tier_exceptions():
    faulty = FaultyTier(failures=1)
    h = TierHierarchy([cpu(8), faulty])
    h.store(keys([0]), blocks([0]))
    assert h.flush(timeout=5)
    h.store(keys([1]), blocks([1]))
    assert h.flush(timeout=5)
    assert list(faulty.stored) == [key(1)]
    s = h.stats()["faulty"]
    assert (s.errors, s.skipped_writes) == (1, 1)
    h.close()


def test_store_copies_blocks_before_returning():
    low = DictTier()
    h = TierHierarchy([cpu(4), low])
    src = block(3)
    h.store(keys([3]), [src])
    src.zero_()  # the engine reuses its buffer at once
    h.flush(timeout=5)
    ok, into = load_ids(h, [3], [1])
    assert ok == [True] and torch.equal(into[0], block(3))
    h.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="write_policy"):
        TierHierarchy([cpu(1)], write_policy="write-around")
    with pytest.raises(ValueError, match="at least one tier"):
        TierHierarchy([])
    with pytest.raises(ValueError, match="queue_bytes"):
        TierHierarchy([cpu(1)], writer=WriterLimits(queue_bytes=0))
    with pytest.raises(ValueError, match="close_timeout_s"):
        WriterLimits(close_timeout_s=-1)


_VALUE = encode_block(key(7), block(7))


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, len(_VALUE) - 1), mask=st.integers(1, 255))
def test_codec_rejects_any_flipped_byte(pos, mask):
    raw = bytearray(_VALUE)
    raw[pos] ^= mask
    with pytest.raises(CorruptBlock):
        decode_block(bytes(raw), key(7))


def test_codec_roundtrip_and_wrong_key():
    assert torch.equal(decode_block(_VALUE, key(7)), block(7))
    with pytest.raises(CorruptBlock, match="another key"):
        decode_block(_VALUE, key(8))
    with pytest.raises(CorruptBlock):
        decode_block(_VALUE[:-1], key(7))


@pytest.mark.gpu
def test_cuda_store_and_load_through_the_hierarchy():
    low = DictTier()
    h = TierHierarchy([cpu(2), low])
    pool = torch.stack(blocks(range(3))).cuda()
    h.store(keys(range(3)), list(pool.unbind(0)))
    pool.zero_()
    assert h.flush(timeout=5)
    locations = h.lookup(keys(range(3)))
    assert locations == [1, 0, 0]
    ok = h.load(keys(range(3)), list(pool.unbind(0)), locations)
    torch.cuda.synchronize()
    assert ok == [True] * 3 and torch.equal(pool.cpu(), torch.stack(blocks(range(3))))
    h.close()
