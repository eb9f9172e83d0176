"""The triton paged-attention kernel against the engine's reference_attention, on the same
pool and block tables: one token, block boundaries, window edges, empty prefix, GQA ratios,
block sizes 16/32/64, mixed prefill + decode steps, split-KV. Without a GPU the kernel runs
through triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
import random

import pytest
import torch

from triton_setup import DEVICE  # noqa: E402,F401  (first: sets TRITON_INTERPRET before triton loads)

from kvtier.engine.attention.metadata import build_attention_metadata  # noqa: E402
from kvtier.engine.attention.paged_attention import reference_attention, write_kv  # noqa: E402
from kvtier.engine.kernels.attention_inputs import from_metadata  # noqa: E402
from kvtier.engine.kernels.paged_attention_triton import (  # noqa: E402
    choose_num_splits,
    paged_attention,
    paged_attention_ref,
)

HD = 16


def run_case(steps, block_size=16, heads=4, kv_heads=2, window=None, num_splits=1, block_n=16,
             layers=2, layer=1, dtype=torch.float32, seed=0, head_dim=HD, block_q=None):
    """steps: (num_computed, num_new) per sequence. Writes random K/V for every position of
    every sequence into a shuffled pool, then compares kernel and reference on one layer."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(done + new) // block_size) for done, new in steps]
    free = list(range(sum(need) + 3))
    rng.shuffle(free)
    pool = torch.randn(len(free), layers, 2, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    specs = [(done, new, [free.pop() for _ in range(n)]) for (done, new), n in zip(steps, need)]
    kv_layer = pool.to(DEVICE)[:, layer]  # a strided view, as the engine binds it
    # The prefix (positions before num_computed) is already in the pool; the new rows are written now.
    meta = build_attention_metadata(specs, block_size, torch.device(DEVICE), window=window)
    tokens = sum(new for _, new in steps)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    write_kv(kv_layer, k, v, meta)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim ** -0.5
    got = paged_attention(q, kv_layer, from_metadata(meta), scale, num_splits=num_splits, block_n=block_n,
                          block_q=block_q)
    want = reference_attention(q, kv_layer, meta, scale)
    return got, want


def check(got, want, atol=2e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


def test_single_token_sequence():
    check(*run_case([(0, 1)]))


def test_empty_prefix_prompt_across_blocks():
    check(*run_case([(0, 37)], heads=2, kv_heads=2))


@pytest.mark.parametrize("done", [15, 16, 17, 31, 32])
def test_decode_at_block_boundaries(done):
    check(*run_case([(done, 1), (done + 1, 1)]))


def test_chunk_over_cached_prefix_crossing_blocks():
    check(*run_case([(16, 19), (5, 11)]))


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)])
def test_gqa_ratios(heads, kv_heads):
    check(*run_case([(20, 1), (0, 9), (7, 5)], heads=heads, kv_heads=kv_heads))


@pytest.mark.parametrize("block_size,block_n", [(16, 32), (32, 16), (64, 16)])
def test_block_sizes_and_tiles_that_differ_from_pages(block_size, block_n):
    check(*run_case([(70, 1), (0, 23), (40, 6)], block_size=block_size, block_n=block_n, kv_heads=1))


@pytest.mark.parametrize("window", [1, 8, 16, 17])
def test_sliding_window_edges(window):
    # Decodes and chunks whose window starts exactly at, just after and inside a block.
    steps = [(window - 1, 1), (window, 1), (window + 16, 1), (40, 9), (0, 21)]
    check(*run_case(steps, window=window))


def test_sliding_group_tables_start_at_the_window():
    """key_start > 0: the table starts at the first block the step's earliest query sees."""
    meta = build_attention_metadata([(50, 3, [9, 8, 7, 6]), (33, 1, [1, 2, 3])], 16, torch.device(DEVICE), window=10)
    assert [s.key_start for s in meta.seqs] == [32, 16]
    check(*run_case([(50, 3), (33, 1), (90, 1)], window=10))


@pytest.mark.parametrize("window", [None, 6])
def test_several_query_tiles_per_sequence(window):
    # Tiles of 2 or 4 tokens: the causal and window bounds move from tile to tile.
    check(*run_case([(9, 21), (0, 13), (4, 1)], heads=8, kv_heads=2, block_q=4, window=window))
    check(*run_case([(3, 7)], heads=8, kv_heads=1, block_q=2, window=window))


def test_mixed_prefill_and_decode_batch_in_one_launch():
    steps = [(0, 12), (30, 1), (5, 1), (18, 14), (0, 1), (47, 1)]
    check(*run_case(steps, heads=4, kv_heads=1))


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_kv_matches_one_split(num_splits):
    steps = [(90, 1), (3, 1), (60, 4)]  # a short context leaves some splits empty
    got, want = run_case(steps, num_splits=num_splits)
    check(got, want)
    got_win, want_win = run_case(steps, num_splits=num_splits, window=20)
    check(got_win, want_win)


def test_ref_wrapper_reads_the_same_inputs_as_the_kernel():
    steps = [(10, 3), (0, 1)]
    got, want = run_case(steps)
    meta = build_attention_metadata([(10, 3, [0, 1]), (0, 1, [2])], 16, torch.device(DEVICE))
    pool = torch.randn(3, 2, 16, 2, HD, device=DEVICE)
    q = torch.randn(4, 4, HD, device=DEVICE)
    torch.testing.assert_close(paged_attention_ref(q, pool, from_metadata(meta), 0.25),
                               reference_attention(q, pool, meta, 0.25))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pool_and_queries(dtype):
    got, want = run_case([(33, 1), (0, 17)], dtype=dtype, kv_heads=1)
    check(got, want, atol=2e-2)


def test_rejects_bad_shapes_and_tiles():
    meta = build_attention_metadata([(0, 2, [0])], 16, torch.device(DEVICE))
    pool = torch.zeros(2, 2, 16, 2, HD, device=DEVICE)
    with pytest.raises(ValueError):
        paged_attention(torch.zeros(2, 3, HD, device=DEVICE), pool, from_metadata(meta), 1.0)  # 3 heads, 2 KV heads
    with pytest.raises(ValueError):
        paged_attention(torch.zeros(2, 4, HD, device=DEVICE), pool, from_metadata(meta), 1.0, block_n=8)


def test_head_dim_not_a_power_of_two():
    check(*run_case([(20, 1), (0, 5)], head_dim=24))


def test_num_splits_heuristic():
    assert choose_num_splits(num_tiles=512, max_seq_len=100_000) == 1  # already enough programs
    assert choose_num_splits(num_tiles=8, max_seq_len=300) == 1  # too short to be worth a merge
    assert choose_num_splits(num_tiles=8, max_seq_len=32_768) == 32


@pytest.mark.slow
def test_random_steps_long_contexts_interpreted():
    rng = random.Random(3)
    for seed in range(3):
        steps = [(rng.randrange(0, 300), 1) for _ in range(3)] + [(rng.randrange(0, 100), rng.randrange(1, 40))]
        check(*run_case(steps, window=rng.choice([None, 64]), num_splits=rng.choice([1, 4]),
                        heads=8, kv_heads=2, seed=seed))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_device_long_decode_and_prefill(dtype):
    rng = random.Random(1)
    steps = [(rng.randrange(1000, 8000), 1) for _ in range(6)] + [(0, 700), (2000, 300)]
    for splits in (1, 8):
        got, want = run_case(steps, heads=32, kv_heads=8, head_dim=128, block_n=64, num_splits=splits, dtype=dtype)
        check(got, want, atol=2e-2)
