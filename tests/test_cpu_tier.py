"""CpuTier: LRU order, byte capacity, eviction hook, slot-reuse safety, threads, tier specs."""
import hashlib
import threading
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.kvstore.tiers.cpu_tier import CpuTier
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.spec import BlockLayout, build_tier, parse_tier_spec

LAYOUT = BlockLayout(shape=(2, 2, 4, 2, 8), dtype=torch.float32, device=torch.device("cpu"))
BLOCK = LAYOUT.nbytes  # 1 KiB


def key(i: int) -> BlockKey:
    return BlockKey(b"testns", hashlib.sha256(str(i).encode()).digest())


def block(i: int) -> torch.Tensor:
    """Content derived from the key id, different in every element, so a mix-up shows."""
    return torch.arange(LAYOUT.nbytes // 4, dtype=torch.float32).view(LAYOUT.shape) + 1000.0 * i


def tier(slots: int, **kw) -> CpuTier:
    return CpuTier(slots * BLOCK, LAYOUT, **kw)


def fetch(t: CpuTier, ids):
    into = [torch.zeros(LAYOUT.shape) for _ in ids]
    return t.get([key(i) for i in ids], into), into


def test_put_get_roundtrip_and_prefix():
    t = tier(4)
    t.put([key(0), key(1), key(2)], [block(0), block(1), block(2)])
    ok, into = fetch(t, [2, 0, 7])
    assert ok == [True, True, False]
    assert torch.equal(into[0], block(2)) and torch.equal(into[1], block(0))
    assert torch.count_nonzero(into[2]) == 0  # a miss leaves the destination alone
    assert t.lookup_prefix([key(0), key(1), key(5), key(2)]) == 2
    assert t.contains([key(5), key(2)]) == [False, True]
    s = t.stats()
    assert (s.hits, s.misses, s.puts, s.bytes_read, s.used_bytes) == (2, 1, 3, 2 * BLOCK, 3 * BLOCK)
    assert t.read_bandwidth() is not None


def test_lru_evicts_least_recent_get_refreshes_lookup_does_not():
    t = tier(3)
    t.put([key(i) for i in range(3)], [block(i) for i in range(3)])
    fetch(t, [0])  # 0 becomes most recent
    assert t.keys_lru() == [key(1), key(2), key(0)]
    t.lookup_prefix([key(1)])
    t.contains([key(1)])  # neither refreshes 1
    t.put([key(3)], [block(3)])
    assert t.contains([key(i) for i in range(4)]) == [True, False, True, True]
    t.put([key(2)], [block(2)])  # re-put refreshes without copying
    t.put([key(4)], [block(4)])
    assert t.keys_lru() == [key(3), key(2), key(4)]  # 0 was least recent
    assert t.stats().evictions == 2 and t.stats().puts == 5


def test_capacity_rounds_down_to_whole_slots():
    t = CpuTier(3 * BLOCK + BLOCK // 2, LAYOUT)
    assert t.allocated_bytes == 3 * BLOCK  # one layout: the slab is allocated up front
    t.put([key(i) for i in range(10)], [block(i) for i in range(10)])
    assert len(t) == 3 and t.stats().used_bytes == 3 * BLOCK <= t.capacity_bytes
    # A batch larger than the slab behaves like one put per block: the last ones stay.
    assert t.keys_lru() == [key(7), key(8), key(9)]
    ok, into = fetch(t, [7, 8, 9])
    assert ok == [True] * 3 and all(torch.equal(x, block(i)) for x, i in zip(into, [7, 8, 9]))


def test_on_evict_gets_copies_of_evicted_blocks():
    seen: list = []
    t = tier(2, on_evict=lambda ks, bs: seen.extend(zip(ks, bs)))
    t.put([key(0), key(1)], [block(0), block(1)])
    t.put([key(2), key(3), key(4)], [block(2), block(3), block(4)])  # evicts 0, 1, then 2 (its own batch)
    assert [k for k, _ in seen] == [key(0), key(1), key(2)]
    for (_, data), i in zip(seen, [0, 1, 2]):
        assert torch.equal(data, block(i))  # intact although their slots were reused
    assert t.keys_lru() == [key(3), key(4)]


def test_evict_hook_is_a_declared_capability_that_can_be_set_and_cleared():
    t = tier(1)
    assert t.supports_evict_hook and t.writes_inline  # what a hierarchy asks, not isinstance
    seen: list = []
    t.set_evict_hook(lambda ks, bs: seen.extend(ks))
    t.put([key(0)], [block(0)])
    t.put([key(1)], [block(1)])
    t.set_evict_hook(None)
    t.put([key(2)], [block(2)])
    assert seen == [key(0)]


def test_reused_slot_is_never_served():
    t = tier(1)
    t.put([key(0)], [block(0)])
    t.put([key(1)], [block(1)])  # key 0's slot now holds key 1
    ok, into = fetch(t, [0, 1])
    assert ok == [False, True] and torch.equal(into[1], block(1))
    # Defence in depth: a map entry pointing at a slot owned by another key is refused.
    t._slot_of[key(0)] = t._slot_of[key(1)]
    ok, _ = fetch(t, [0])
    assert ok == [False] and t.stats().errors == 1


def test_delete_frees_slots_and_bad_shapes_are_rejected():
    t = tier(2)
    t.put([key(0), key(1)], [block(0), block(1)])
    t.delete([key(0), key(9)])
    t.put([key(2)], [block(2)])
    assert t.stats().evictions == 0 and t.contains([key(1), key(2)]) == [True, True]
    with pytest.raises(ValueError, match="shape"):
        t.put([key(3)], [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="float64"):
        t.get([key(1)], [torch.zeros(LAYOUT.shape, dtype=torch.float64)])
    with pytest.raises(ValueError, match="keys"):
        t.put([key(3)], [])


class LruModel:
    """Obviously correct reference: an ordered dict of key ids, one put per block."""

    def __init__(self, slots: int):
        self.slots, self.d, self.evictions = slots, OrderedDict(), 0

    def put(self, ids):
        for i in ids:
            if i in self.d:
                self.d.move_to_end(i)
                continue
            if len(self.d) == self.slots:
                self.d.popitem(last=False)
                self.evictions += 1
            self.d[i] = True

    def get(self, ids):
        out = []
        for i in ids:
            out.append(i in self.d)
            if i in self.d:
                self.d.move_to_end(i)
        return out

    def delete(self, ids):
        for i in ids:
            self.d.pop(i, None)


ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "lookup", "delete"]), st.lists(st.integers(0, 11), max_size=7)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(1, 6), ops=ops)
def test_matches_reference_lru_and_never_exceeds_capacity(slots, ops):
    t, model = tier(slots), LruModel(slots)
    for op, ids in ops:
        if op == "put":
            t.put([key(i) for i in ids], [block(i) for i in ids])
            model.put(ids)
        elif op == "get":
            ok, into = fetch(t, ids)
            assert ok == model.get(ids)
            assert all(torch.equal(x, block(i)) for x, i, hit in zip(into, ids, ok) if hit)
        elif op == "lookup":
            expect = next((n for n, i in enumerate(ids) if i not in model.d), len(ids))
            assert t.lookup_prefix([key(i) for i in ids]) == expect
        else:
            t.delete([key(i) for i in ids])
            model.delete(ids)
        assert t.keys_lru() == [key(i) for i in model.d]
        s = t.stats()
        assert s.used_bytes == len(model.d) * BLOCK <= t.capacity_bytes
        assert s.evictions == model.evictions


def test_concurrent_put_get_keeps_data_intact():
    t = tier(24)
    errors: list = []

    def worker(seed: int):
        g = torch.Generator().manual_seed(seed)
        for _ in range(150):
            ids = torch.randint(0, 48, (4,), generator=g).tolist()
            if torch.rand(1, generator=g).item() < 0.5:
                t.put([key(i) for i in ids], [block(i) for i in ids])
            else:
                ok, into = fetch(t, ids)
                errors.extend(i for i, x, hit in zip(ids, into, ok) if hit and not torch.equal(x, block(i)))
            if len(t) > 24:
                errors.append("over capacity")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert t.stats().used_bytes <= t.capacity_bytes


def test_from_spec_builds_a_cpu_tier():
    t = build_tier("cpu:8KiB", LAYOUT)
    assert isinstance(t, CpuTier) and t.allocated_bytes == 8 * BLOCK and t.name == "cpu"
    assert build_tier(parse_tier_spec("cpu:4KiB?pin=0"), [LAYOUT]).allocated_bytes == 4 * BLOCK


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cpu:", "needs a size"),
        ("cpu:4XB", "cannot parse"),
        ("cpu:-1GiB", "cannot parse"),
        ("floppy:1GiB", "unknown tier 'floppy'"),
        ("cpu", "expected SCHEME"),
        ("cpu:100", "smaller than one block"),
        ("cpu:4KiB?bogus=1", "unknown option"),
        ("cpu:4KiB?pin=maybe", "not a boolean"),
    ],
)
def test_bad_specs_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        build_tier(spec, LAYOUT)
    assert repr(spec) in str(err.value) or spec in str(err.value)


@pytest.mark.gpu
def test_cuda_pool_views_roundtrip_through_pinned_slab():
    pool = torch.stack([block(i) for i in range(4)]).cuda()  # page-first device pool
    t = tier(3)
    assert t._view[0].is_pinned()
    t.put(keys := [key(i) for i in range(4)], list(pool.unbind(0)))  # block 0 is evicted
    pool.zero_()
    ok = t.get(keys, list(pool.unbind(0)))
    t.put([key(9)], [block(9).cuda()])  # reuses a slot just read asynchronously: must wait
    torch.cuda.synchronize()
    assert ok == [False, True, True, True]
    assert all(torch.equal(pool[i].cpu(), block(i)) for i in (1, 2, 3))
