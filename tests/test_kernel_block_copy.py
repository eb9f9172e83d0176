"""Block gather / scatter kernels against index_select / index_copy_: bit-exact for every pool
dtype, in any id order, leaving other blocks untouched. Interpreted without a GPU."""

import pytest
import torch

from triton_setup import DEVICE  # noqa: E402,F401  (first: sets TRITON_INTERPRET before triton loads)

from kvtier.engine.kernels.block_copy_triton import (  # noqa: E402
    gather_blocks,
    gather_blocks_ref,
    scatter_blocks,
    scatter_blocks_ref,
)

SHAPE = (9, 3, 2, 16, 2, 8)  # [num_blocks, layers, 2, block_size, kv_heads, head_dim]


def random_pool(dtype, shape=SHAPE):
    x = torch.randn(shape, device=DEVICE) * 10
    return x.to(dtype)


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_gather_matches_index_select(dtype):
    pool = random_pool(dtype)
    ids = torch.tensor([7, 0, 3, 8], dtype=torch.int32, device=DEVICE)
    got = gather_blocks(pool, ids)
    assert got.shape == (4, *SHAPE[1:]) and got.dtype == dtype
    assert same_bits(got, gather_blocks_ref(pool, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_scatter_matches_index_copy(dtype):
    pool = random_pool(dtype)
    staging = random_pool(dtype, (5, *SHAPE[1:]))
    ids = torch.tensor([2, 6, 1], dtype=torch.long, device=DEVICE)  # fewer ids than staging rows
    want = pool.clone()
    scatter_blocks_ref(staging, want, ids)
    scatter_blocks(staging, pool, ids)
    assert same_bits(pool, want)
    assert same_bits(pool[6], staging[1])


def test_roundtrip_moves_blocks_to_new_ids_and_leaves_the_rest():
    pool = random_pool(torch.bfloat16)
    before = pool.clone()
    staging = torch.empty((3, *SHAPE[1:]), dtype=pool.dtype, device=DEVICE)
    gather_blocks(pool, torch.tensor([1, 4, 5], device=DEVICE), staging)
    scatter_blocks(staging, pool, torch.tensor([8, 0, 2], device=DEVICE))
    assert torch.equal(pool[[8, 0, 2]], before[[1, 4, 5]])
    assert torch.equal(pool[[1, 3, 4, 5, 6, 7]], before[[1, 3, 4, 5, 6, 7]])


def test_odd_byte_rows_copy_as_bytes():
    shape = (4, 1, 2, 3, 1, 3)  # 18 fp8 bytes per block: not a whole number of words
    pool = random_pool(torch.float8_e4m3fn, shape)
    ids = torch.tensor([3, 1], device=DEVICE)
    assert same_bits(gather_blocks(pool, ids), gather_blocks_ref(pool, ids))


def test_empty_batch_and_bad_staging():
    pool = random_pool(torch.float32)
    assert gather_blocks(pool, torch.empty(0, dtype=torch.long, device=DEVICE)).shape == (0, *SHAPE[1:])
    with pytest.raises(ValueError):
        gather_blocks(pool, torch.tensor([0], device=DEVICE), torch.empty(1, 3, 2, 16, 2, 4, device=DEVICE))
    with pytest.raises(ValueError):
        gather_blocks(pool[:, :2], torch.tensor([0], device=DEVICE))  # not contiguous per block


@pytest.mark.gpu
def test_real_device_gather_into_pinned_host_staging_and_back():
    pool = random_pool(torch.bfloat16, (4096, 8, 2, 16, 8, 128))
    ids = torch.randperm(4096, device=DEVICE)[:256]
    staging = torch.empty((256, *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    gather_blocks(pool, ids, staging)
    torch.cuda.synchronize()
    assert torch.equal(staging, gather_blocks_ref(pool, ids).cpu())
    target = torch.randperm(4096, device=DEVICE)[:256]
    want = pool.clone()
    scatter_blocks_ref(staging.to(DEVICE), want, target)
    scatter_blocks(staging, pool, target)
    torch.cuda.synchronize()
    assert torch.equal(pool, want)
