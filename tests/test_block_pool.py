"""Block pool and prefix-cache invariants, driven through the real scheduler by hypothesis."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.engine.block_hash import extend_block_hashes, hash_block, model_namespace, root_hash
from kvtier.engine.block_pool import BlockPool
from kvtier.engine.kv_cache_manager import KVCacheManager
from kvtier.engine.request import Request
from kvtier.engine.sampling_params import SamplingParams
from kvtier.engine.scheduler import Scheduler

BS = 4
ROOT = root_hash(model_namespace("w", "float32", "page-first-v1", BS), None)


def _check_invariants(kv: KVCacheManager, shadow: dict[int, list]) -> None:
    pool = kv.pool
    held: dict[int, int] = {}
    for blocks in kv.req_blocks.values():
        for b in blocks:
            held[b.block_id] = held.get(b.block_id, 0) + 1
    free_ids = {b.block_id for b in pool.free_queue}
    for b in pool.blocks:
        assert b.ref_cnt >= 0
        assert b.ref_cnt == held.get(b.block_id, 0), "ref count must equal the number of holders"
        assert (b.ref_cnt == 0) == (b.block_id in free_ids)
    assert pool.free_queue.size == len(free_ids)
    for h, b in pool.cached.items():
        assert b.block_hash == h
        # The block's device contents (shadow) are exactly the tokens the hash was made from.
        assert tuple(shadow[b.block_id]) == b.token_ids


def _run(prompts, max_tokens, num_blocks, budget, caching, seed):
    kv = KVCacheManager(num_blocks, BS, caching)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=64)
    rng = random.Random(seed)
    shadow = {i: [None] * BS for i in range(num_blocks)}
    reqs = []
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        r = Request(str(i), list(p), SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), hash_root=ROOT)
        if sched.add(r) is None:
            reqs.append(r)
    finished = set()
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        sampled = {}
        for seq in out.seqs:
            toks = seq.request.token_ids_slice(seq.num_computed, seq.num_computed + seq.num_new)
            for j, pos in enumerate(range(seq.num_computed, seq.num_computed + seq.num_new)):
                shadow[seq.block_ids[pos // BS]][pos % BS] = toks[j]
            if seq.samples:
                sampled[seq.request.request_id] = rng.randrange(3)
        finished.update(r.request_id for r in sched.update(out, sampled))
        _check_invariants(kv, shadow)
    assert finished == {r.request_id for r in reqs}, "every accepted request must finish"
    # All requests ended: every block is back in the free queue.
    assert kv.pool.num_free_blocks == num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    return reqs


prompt_st = st.lists(st.integers(0, 2), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(
    prompts=st.lists(prompt_st, min_size=1, max_size=6),
    max_tokens=st.lists(st.integers(1, 8), min_size=6, max_size=6),
    num_blocks=st.integers(7, 24),
    budget=st.integers(1, 12),
    caching=st.booleans(),
    seed=st.integers(0, 100),
)
def test_pool_invariants_under_random_workloads(prompts, max_tokens, num_blocks, budget, caching, seed):
    reqs = _run(prompts, max_tokens, num_blocks, budget, caching, seed)
    for r in reqs:
        assert 1 <= len(r.output_token_ids) <= r.sampling_params.max_tokens


def test_shared_prefix_hits_and_lru_eviction_order():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=True)
    a = Request("a", list(range(9)), SamplingParams(max_tokens=1), hash_root=ROOT)
    kv.update_block_hashes(a)
    assert kv.allocate_slots(a, 9) is not None
    kv.free(a)
    b = Request("b", list(range(8)) + [7, 7], SamplingParams(max_tokens=1), hash_root=ROOT)
    kv.update_block_hashes(b)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv_block_ids_of_first(kv, a, 2)
    # Freed in reverse order: the tail of `a` is evicted before its head, which more requests share.
    assert [blk.block_id for blk in kv.pool.free_queue] == [3, 4, 5, 2, 1, 0]
    kv.pool.allocate(5)  # takes 3, 4, 5, 2 and then block 1 (tokens 4..7), evicting its hash
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and [h.block_id for h in hits] == [0]
    assert kv.pool.num_evictions == 1


def kv_block_ids_of_first(kv, req, n):
    return [kv.pool.cached[h].block_id for h in req.block_hashes[:n]]


def test_salt_and_model_namespace_separate_hashes():
    tokens = list(range(8))
    roots = [
        root_hash(model_namespace("w1", "float32", "l", BS), None),
        root_hash(model_namespace("w2", "float32", "l", BS), None),
        root_hash(model_namespace("w1", "float32", "l", BS), "tenant-a"),
        root_hash(model_namespace("w1", "bfloat16", "l", BS), None),
    ]
    chains = []
    for r in roots:
        h: list[bytes] = []
        extend_block_hashes(h, r, tokens, len(tokens), BS)
        chains.append(tuple(h))
    assert len(set(chains)) == len(chains)
    assert chains[0][1] == hash_block(chains[0][0], tokens[4:8])


def test_hash_collision_is_not_served():
    pool = BlockPool(2)
    [blk] = pool.allocate(1)
    pool.cache_block(blk, b"h", [1, 2, 3, 4])
    assert pool.get_cached_block(b"h", [1, 2, 3, 4]) is blk
    assert pool.get_cached_block(b"h", [9, 9, 9, 9]) is None
