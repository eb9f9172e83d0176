"""Tier saves and loads through the block-copy kernel and staging buffers
(connectors/device_copy.py): bytes round-trip exactly, a load writes only the blocks that
loaded, KV groups of different layouts each get their own staging. Without a GPU the triton
gather / scatter run interpreted on CPU pools; the `gpu` cases run them on CUDA pools with
pinned staging, and through the engine."""
import contextlib
import hashlib
import random

import pytest
import torch

from triton_setup import DEVICE  # noqa: E402,F401  (first: sets TRITON_INTERPRET before triton loads)

from kvtier.connectors.device_copy import DeviceBlockMover  # noqa: E402
from kvtier.engine.kernels.tier_copy import TritonBlockCopy, block_copy_for  # noqa: E402
from kvtier.kvstore.hierarchy import TierHierarchy  # noqa: E402
from kvtier.kvstore.keys import BlockKey  # noqa: E402
from kvtier.kvstore.tiers.cpu_tier import CpuTier  # noqa: E402
from kvtier.kvstore.tiers.spec import BlockLayout  # noqa: E402

SHAPES = [(2, 2, 16, 2, 8), (1, 2, 16, 1, 12)]  # two KV groups with different block layouts


def key(i: int, group: int = 0) -> BlockKey:
    return BlockKey(b"ns", hashlib.sha256(str(i).encode()).digest(), group)


def pools(device, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(12, *s, generator=gen).to(dtype).to(device) for s in SHAPES]


def hierarchy(device, dtype=torch.bfloat16):
    layouts = [BlockLayout(s, dtype, torch.device(device)) for s in SHAPES]
    return TierHierarchy([CpuTier(1 << 20, layouts)])


def run_round_trip(device):
    src, dst = pools(device, seed=1), pools(device, seed=2)
    before = [p.clone() for p in dst]
    mover = DeviceBlockMover(TritonBlockCopy())
    tiers = hierarchy(device)
    mover.store(tiers, src[0], [3, 5, 7], [key(3), key(5), key(7)])
    mover.store(tiers, src[1], [2, 9], [key(2, 1), key(9, 1)])
    # Load into other ids; key 4 was never stored, so its block must stay as it was.
    keys = [key(3), key(4), key(7), key(2, 1), key(9, 1)]
    ids = [1, 2, 4, 11, 0]
    ok = mover.load(tiers, dst, ids, keys, [0] * len(keys))
    assert ok == [True, False, True, True, True]
    assert torch.equal(dst[0][1], src[0][3]) and torch.equal(dst[0][4], src[0][7])
    assert torch.equal(dst[0][2], before[0][2])  # the failed block is untouched
    assert torch.equal(dst[1][11], src[1][2]) and torch.equal(dst[1][0], src[1][9])
    untouched = [i for i in range(12) if i not in (1, 4)]
    assert torch.equal(dst[0][untouched], before[0][untouched])
    # Staging buffers are kept for reuse, one free list per layout.
    assert len(mover.staging._free) == 2
    tiers.close()


def test_round_trip_through_staging():
    run_round_trip(DEVICE)


class CountingCopy(TritonBlockCopy):
    def __init__(self):
        super().__init__()
        self.calls = []

    def gather(self, pool, block_ids, staging):
        self.calls.append(("gather", pool.shape))
        super().gather(pool, block_ids, staging)

    def scatter(self, staging, pool, block_ids):
        self.calls.append(("scatter", pool.shape))
        super().scatter(staging, pool, block_ids)


def test_warm_up_runs_both_kernels_on_every_pool_and_changes_nothing():
    """Registering pools compiles the copy kernels (one gather and one scatter per pool),
    so the first load a request waits on pays no compile; the pools keep their bytes."""
    ps = pools(DEVICE)
    before = [p.clone() for p in ps]
    copy = CountingCopy()
    DeviceBlockMover(copy).warm_up(ps)
    assert copy.calls == [(op, p.shape) for p in ps for op in ("gather", "scatter")]
    assert all(torch.equal(a, b) for a, b in zip(ps, before))


def test_staging_reuses_a_free_buffer_that_is_not_first_and_keeps_at_most_four():
    """Two free buffers of one layout: taking the second must not compare tensors (a free
    list searched with `==` raised here on the first GPU run)."""
    mover = DeviceBlockMover(TritonBlockCopy())
    pool = pools(DEVICE)[0]
    with mover.staging.rows(pool, 1):
        pass
    with mover.staging.rows(pool, 4):
        pass
    with mover.staging.rows(pool, 3) as again:
        assert again.shape[0] == 3
    free = next(iter(mover.staging._free.values()))
    assert [b.shape[0] for b in free] == [1, 4]
    with contextlib.ExitStack() as stack:  # five held at once: the smallest is dropped on return
        for n in (1, 2, 4, 8, 16):
            stack.enter_context(mover.staging.rows(pool, n))
    assert sorted(b.shape[0] for b in free) == [4, 4, 8, 16]  # 2 rows came from the free 4


def test_block_copy_only_for_cuda():
    assert block_copy_for("cpu") is None  # CPU pools: the hierarchy copies straight out of them


@pytest.mark.gpu
def test_cuda_pools_use_pinned_staging():
    run_round_trip("cuda")
    mover = DeviceBlockMover(TritonBlockCopy())
    pool = pools("cuda")[0]
    with mover.staging.rows(pool, 3) as staged:
        assert staged.is_pinned() and staged.shape == (3, *SHAPES[0])


@pytest.mark.gpu
def test_engine_tier_round_trip_on_cuda(tmp_path):
    """A CUDA engine with a CPU tier saves and reloads through the kernel path, and its
    greedy tokens equal those of a run that never touches the tier."""
    from hf_checkpoints import make_variant

    from kvtier import LLM, SamplingParams

    path = make_variant(tmp_path, "llama")
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(n)]} for n in (40, 130, 300)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(path, device="cuda", dtype="float32") as llm:
        reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    block_bytes = 3 * 2 * 16 * 2 * 16 * 4
    with LLM(path, device="cuda", dtype="float32", kv_cache_memory_bytes=24 * block_bytes,
             kv_tiers=["cpu:64MiB"], kv_connector_config={"load_or_recompute": False}) as llm:
        assert llm.engine.connector._mover is not None
        llm.generate(prompts, params, use_tqdm=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert sum(o.kv_sources.get("cpu", 0) for o in outs) > 0
