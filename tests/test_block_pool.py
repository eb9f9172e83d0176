"""Block pool, prefix-cache and KV-group invariants, driven through the real scheduler by
hypothesis: for every KV group mix (dense, sliding window, SSM state), each step reads only
blocks and state slots whose (simulated) contents are exactly the request's own tokens, ref
counts match holders, sliding groups stay bounded by the window, and everything returns to
its pool when the requests end."""
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.connectors.groups import GroupInfo
from kvtier.engine.attention.ssm_metadata import NO_SLOT
from kvtier.engine.kv_cache.block_hash import extend_block_hashes, hash_block, model_namespace, root_hash
from kvtier.engine.kv_cache.block_pool import BlockPool
from kvtier.engine.kv_cache.coordinator import KVCacheCoordinator
from kvtier.engine.kv_cache.specs import FullAttentionSpec, KVGroup, MambaSpec, SlidingWindowSpec
from kvtier.engine.request import Request
from kvtier.engine.sampling_params import SamplingParams
from kvtier.engine.scheduler import Scheduler
from kvtier.kvstore.tiers.spec import BlockLayout

BS = 4
WINDOW = 6  # not a multiple of the block size
ROOT = root_hash(model_namespace("w", "float32", "page-first-v1", BS), None)
MIXES = [("full",), ("full", "sliding"), ("sliding",), ("ssm",), ("full", "ssm"), ("sliding", "full", "ssm")]
_SPECS = {"full": FullAttentionSpec(1, 2), "sliding": SlidingWindowSpec(1, 2, WINDOW),
          "ssm": MambaSpec((2, 1), (1, 1, 1))}


def make_coordinator(kinds, num_blocks, caching, budget, interval=8, track=False) -> KVCacheCoordinator:
    groups = [KVGroup(i, _SPECS[k], (i,)) for i, k in enumerate(kinds)]
    infos = [GroupInfo(k, BlockLayout(g.block_shape(BS), torch.float32, torch.device("cpu")),
                       WINDOW if k == "sliding" else None) for g, k in zip(groups, kinds)]
    sizes = [max(num_blocks, 6) if k == "ssm" else num_blocks for k in kinds]
    return KVCacheCoordinator(groups, infos, sizes, BS, caching, budget, interval, track_transfers=track)


def _holders(m) -> dict[int, int]:
    held: dict[int, int] = {}
    if m.group.kind == "ssm":
        blocks = [b for st in m.states.values() for b in st.held()]
    else:
        blocks = [b for table in m.req_blocks.values() for b in table if b is not None]
    for b in blocks:
        held[b.block_id] = held.get(b.block_id, 0) + 1
    return held


def _check_invariants(kv: KVCacheCoordinator, shadows: list[dict], sched: Scheduler) -> None:
    for m, shadow in zip(kv.managers, shadows):
        pool = m.pool
        held = _holders(m)
        free_ids = {b.block_id for b in pool.free_queue}
        for b in pool.blocks:
            assert b.ref_cnt == held.get(b.block_id, 0), "ref count must equal the number of holders"
            assert (b.ref_cnt == 0) == (b.block_id in free_ids)
        assert pool.free_queue.size == len(free_ids)
        for h, b in pool.cached.items():
            assert b.block_hash == h
            if m.group.kind == "ssm":  # a checkpoint holds the state of a prefix ending in these tokens
                assert len(shadow[b.block_id]) % BS == 0 and tuple(shadow[b.block_id][-BS:]) == b.token_ids
            else:  # the block's device contents are exactly the tokens the hash was made from
                assert tuple(shadow[b.block_id]) == b.token_ids
        if m.group.kind == "sliding":
            for req in sched.running:
                assert m.held_blocks(req.request_id) <= (WINDOW + kv.max_num_batched_tokens) // BS + 3


def _run_step(out, kv, shadows, rng) -> dict[str, int]:
    """Check what each sequence reads, then write what it computes, per group."""
    sampled = {}
    for seq in out.seqs:
        req, start, end = seq.request, seq.num_computed, seq.num_computed + seq.num_new
        tokens = req.token_ids_slice(0, end)
        for m, view, shadow in zip(kv.managers, seq.block_ids, shadows):
            if m.group.kind == "ssm":
                init, live, checkpoints = view
                assert (init == NO_SLOT) == (start == 0), "a continuing sequence must start from a state"
                if init != NO_SLOT:
                    assert shadow[init] == tuple(tokens[:start]), "a state slot must hold exactly this prefix"
                shadow[live] = tuple(tokens)
                for n, slot in checkpoints:
                    shadow[slot] = tuple(tokens[:start + n])
                continue
            first = m.info.first_visible_block(start, BS)
            for pos in range(first * BS, start):
                assert shadow[view[pos // BS]][pos % BS] == tokens[pos], "a block read must hold this prefix"
            for pos in range(start, end):
                shadow[view[pos // BS]][pos % BS] = tokens[pos]
        if seq.samples:
            sampled[req.request_id] = rng.randrange(3)
    return sampled


def _run(prompts, max_tokens, num_blocks, budget, caching, seed, kinds=("full",)):
    kv = make_coordinator(kinds, num_blocks, caching, budget)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=64)
    rng = random.Random(seed)
    shadows = [{i: [None] * BS for i in range(m.pool.num_blocks)} if m.group.kind != "ssm" else {}
               for m in kv.managers]
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
        sampled = _run_step(out, kv, shadows, rng)
        finished.update(r.request_id for r in sched.update(out, sampled))
        _check_invariants(kv, shadows, sched)
    assert finished == {r.request_id for r in reqs}, "every accepted request must finish"
    # All requests ended: every block and state slot is back in its pool's free queue.
    for m in kv.managers:
        assert m.pool.num_free_blocks == m.pool.num_blocks
        assert all(b.ref_cnt == 0 for b in m.pool.blocks)
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
    mix=st.sampled_from(MIXES),
)
def test_pool_invariants_under_random_workloads(prompts, max_tokens, num_blocks, budget, caching, seed, mix):
    reqs = _run(prompts, max_tokens, num_blocks, budget, caching, seed, mix)
    for r in reqs:
        assert 1 <= len(r.output_token_ids) <= r.sampling_params.max_tokens


def test_shared_prefix_hits_and_lru_eviction_order():
    kv = make_coordinator(("full",), num_blocks=6, caching=True, budget=64)
    pool = kv.managers[0].pool
    a = Request("a", list(range(9)), SamplingParams(max_tokens=1), hash_root=ROOT)
    kv.update_block_hashes(a)
    assert kv.allocate_slots(a, 9)
    kv.free(a)
    b = Request("b", list(range(8)) + [7, 7], SamplingParams(max_tokens=1), hash_root=ROOT)
    kv.update_block_hashes(b)
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 8 and [h.block_id for h in hit.blocks[0]] == [pool.cached[h].block_id
                                                                           for h in a.block_hashes[:2]]
    # Freed in reverse order: the tail of `a` is evicted before its head, which more requests share.
    assert [blk.block_id for blk in pool.free_queue] == [3, 4, 5, 2, 1, 0]
    pool.allocate(5)  # takes 3, 4, 5, 2 and then block 1 (tokens 4..7), evicting its hash
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 4 and [h.block_id for h in hit.blocks[0]] == [0]
    assert pool.num_evictions == 1


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
