"""CpuTier with several block layouts (KV groups of a hybrid model) under one byte budget."""
import hashlib
import random
from collections import OrderedDict

import pytest
import torch

from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.cpu_tier import CpuTier
from kvtier.kvstore.tiers.spec import BlockLayout, build_tier

CPU = torch.device("cpu")
SMALL = BlockLayout((1, 2, 4, 2, 4), torch.float32, CPU)  # 256 B: a sliding-window block
MID = BlockLayout((2, 2, 4, 2, 8), torch.bfloat16, CPU)  # 1 KiB: a full-attention block
BIG = BlockLayout((2, 1024), torch.float32, CPU)  # 8 KiB: an SSM state slot
LAYOUTS = (SMALL, MID, BIG)
S, M, B = SMALL.nbytes, MID.nbytes, BIG.nbytes


def key(i: int) -> BlockKey:
    return BlockKey(b"hybrid", hashlib.sha256(str(i).encode()).digest())


def block(i: int, layout: BlockLayout) -> torch.Tensor:
    """Random bits seeded by the id, NaN patterns included, so any mix-up or lossy copy shows."""
    g = torch.Generator().manual_seed(i)
    raw = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(layout.dtype).view(layout.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def put(t: CpuTier, items):
    """items: (id, layout) pairs."""
    t.put([key(i) for i, _ in items], [block(i, l) for i, l in items])


def fetch(t: CpuTier, items):
    into = [torch.zeros(l.shape, dtype=l.dtype) for _, l in items]
    return t.get([key(i) for i, _ in items], into), into


def test_roundtrip_is_bit_exact_per_layout_and_stats_count_each_blocks_size():
    t = CpuTier(64 * 1024, LAYOUTS)
    items = [(0, SMALL), (1, BIG), (2, MID), (3, SMALL), (4, BIG)]
    put(t, items)
    ok, into = fetch(t, items)
    assert ok == [True] * 5
    assert all(same_bits(x, block(i, l)) for x, (i, l) in zip(into, items))
    s = t.stats()
    assert s.used_bytes == 2 * S + M + 2 * B
    assert s.bytes_written == s.bytes_read == 2 * S + M + 2 * B
    assert t.allocated_bytes == 2 * S + M + 2 * B  # several layouts: memory on demand


def test_one_lru_order_and_one_byte_budget_across_layouts():
    t = CpuTier(B + 4 * M, LAYOUTS)
    put(t, [(0, MID), (1, BIG), (2, MID), (3, MID)])  # 3 KiB + 8 KiB of 12 KiB
    fetch(t, [(0, MID)])  # 0 becomes most recent
    assert t.keys_lru() == [key(1), key(2), key(3), key(0)]
    put(t, [(4, MID), (5, MID)])  # 4 fills the budget; 5 evicts the LRU block, a big one
    assert t.keys_lru() == [key(2), key(3), key(0), key(4), key(5)]
    assert t.stats().evictions == 1 and t.stats().used_bytes == 5 * M
    put(t, [(6, BIG)])  # 5 KiB + 8 KiB: only the least recent mid block has to go
    assert t.keys_lru() == [key(3), key(0), key(4), key(5), key(6)]
    put(t, [(7, BIG)])  # the four mid blocks free 4 KiB, not enough: the big one goes too
    assert t.keys_lru() == [key(7)] and t.stats().evictions == 7
    assert t.stats().used_bytes == B and t.allocated_bytes <= t.capacity_bytes


def test_a_big_block_evicts_several_small_ones_and_a_small_one_evicts_one_big():
    t = CpuTier(2 * B, LAYOUTS)
    smalls = [(i, SMALL) for i in range(64)]  # 64 x 256 B = 2 x 8 KiB: full
    put(t, smalls)
    put(t, [(100, BIG)])
    assert t.stats().evictions == 32 and len(t) == 33  # exactly the 32 oldest small blocks
    assert t.keys_lru() == [key(i) for i in range(32, 64)] + [key(100)]
    put(t, [(101, BIG)])  # evicts the other 32
    assert t.keys_lru() == [key(100), key(101)]
    put(t, [(200, SMALL)])  # one small block evicts the one least recent big block
    assert t.keys_lru() == [key(101), key(200)] and t.stats().evictions == 65
    assert t.stats().used_bytes == B + S and t.allocated_bytes <= t.capacity_bytes
    ok, into = fetch(t, [(101, BIG), (200, SMALL)])
    assert ok == [True, True] and same_bits(into[0], block(101, BIG)) and same_bits(into[1], block(200, SMALL))


def test_evict_hook_gets_copies_of_mixed_layouts_even_when_their_memory_is_reused():
    seen = []
    t = CpuTier(B + 2 * M, LAYOUTS, on_evict=lambda ks, bs: seen.extend(zip(ks, bs)))
    put(t, [(0, MID), (1, SMALL), (2, BIG)])
    # One batch: 3 evicts 0 (MID), 4 evicts 1 (SMALL), 5 evicts 2 (BIG), and 6 evicts 3,
    # a block of its own batch that never reached the tier's memory.
    put(t, [(3, MID), (4, MID), (5, BIG), (6, MID)])
    expect = [(0, MID), (1, SMALL), (2, BIG), (3, MID)]
    assert [k for k, _ in seen] == [key(i) for i, _ in expect]
    assert all(same_bits(data, block(i, l)) for (_, data), (i, l) in zip(seen, expect))
    assert t.keys_lru() == [key(4), key(5), key(6)]
    resident = [(4, MID), (5, BIG), (6, MID)]
    ok, into = fetch(t, resident)
    assert ok == [True] * 3 and all(same_bits(x, block(i, l)) for x, (i, l) in zip(into, resident))


def test_delete_keeps_spares_that_other_layouts_can_take_back():
    t = CpuTier(2 * B, LAYOUTS)
    put(t, [(i, SMALL) for i in range(64)])
    t.delete([key(i) for i in range(64)])
    assert t.stats().used_bytes == 0 and t.allocated_bytes == 2 * B  # spares, reusable
    put(t, [(1, BIG), (2, BIG)])  # fits only if the small spares are released
    assert t.stats().evictions == 0 and t.allocated_bytes == 2 * B
    ok, into = fetch(t, [(1, BIG), (2, BIG)])
    assert ok == [True, True] and same_bits(into[1], block(2, BIG))


def test_wrong_shape_or_dtype_is_rejected_and_a_block_never_lands_in_another_layout():
    t = CpuTier(4 * B, LAYOUTS)
    with pytest.raises(ValueError, match="expected"):
        t.put([key(0)], [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="float64"):  # a known shape with the wrong dtype
        t.put([key(0)], [torch.zeros(BIG.shape, dtype=torch.float64)])
    with pytest.raises(ValueError, match="destination"):
        t.get([key(0)], [torch.zeros(MID.shape, dtype=torch.float32)])
    put(t, [(1, BIG)])
    ok, into = fetch(t, [(1, SMALL)])  # asked into another group's block: not served
    assert ok == [False] and torch.count_nonzero(into[0]) == 0 and t.stats().errors == 1


def test_capacity_below_the_largest_block_is_rejected_naming_the_sizes():
    with pytest.raises(ValueError, match=rf"capacity {B - 1} bytes .*\({B} bytes for shape \(2, 1024\)"):
        CpuTier(B - 1, LAYOUTS)
    with pytest.raises(ValueError, match="smaller than one block"):
        build_tier("cpu:4KiB", [SMALL, BIG])
    assert isinstance(build_tier("cpu:8KiB?pin=0", [SMALL, BIG]), CpuTier)
    with pytest.raises(ValueError, match="at least one"):
        CpuTier(B, [])


class ByteLru:
    """Obviously correct reference: an ordered dict of id -> bytes, one put per block."""

    def __init__(self, capacity: int):
        self.capacity, self.d, self.evicted = capacity, OrderedDict(), []

    def put(self, items):
        for i, layout in items:
            if i in self.d:
                self.d.move_to_end(i)
                continue
            while sum(self.d.values()) + layout.nbytes > self.capacity:
                self.evicted.append(self.d.popitem(last=False)[0])
            self.d[i] = layout.nbytes

    def get(self, ids):
        for i in ids:
            if i in self.d:
                self.d.move_to_end(i)
        return [i in self.d for i in ids]


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_byte_lru_model_over_random_mixed_operations(seed):
    rng = random.Random(seed)
    capacity = rng.choice([B, B + 3 * M, 3 * B + S, 5 * B])
    evicted = []
    t = CpuTier(capacity, LAYOUTS, on_evict=lambda ks, bs: evicted.extend(zip(ks, bs)))
    model = ByteLru(capacity)
    layout_of = {i: rng.choice(LAYOUTS) for i in range(40)}  # a key names one group's block
    for _ in range(300):
        op = rng.choice(["put", "put", "get", "delete", "lookup"])
        ids = [rng.randrange(40) for _ in range(rng.randint(0, 6))]
        items = [(i, layout_of[i]) for i in ids]
        if op == "put":
            put(t, items)
            model.put(items)
        elif op == "get":
            ok, into = fetch(t, items)
            assert ok == model.get(ids)
            assert all(same_bits(x, block(i, l)) for x, (i, l), hit in zip(into, items, ok) if hit)
        elif op == "delete":
            t.delete([key(i) for i in ids])
            for i in ids:
                model.d.pop(i, None)
        else:
            expect = next((n for n, i in enumerate(ids) if i not in model.d), len(ids))
            assert t.lookup_prefix([key(i) for i in ids]) == expect
        assert t.keys_lru() == [key(i) for i in model.d]
        assert t.stats().used_bytes == sum(model.d.values()) <= capacity
        assert t.allocated_bytes <= capacity
    assert [k for k, _ in evicted] == [key(i) for i in model.evicted]
    assert all(same_bits(data, block(i, layout_of[i])) for (_, data), i in zip(evicted, model.evicted))
