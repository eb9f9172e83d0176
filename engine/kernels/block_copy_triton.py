"""Block gather / scatter in triton, for moving KV blocks between the device pool and a tier.

In the page-first pool one block of a group (all its layers, K and V) is one contiguous row,
`pool[block_id]`. Saving a batch of blocks gathers those rows into a contiguous staging
buffer; loading scatters staged rows back to (other) block ids. Each direction is one launch
for the whole batch, instead of one copy per block. On CUDA the staging buffer may be pinned
host memory (device-mapped through unified addressing), so the gather writes straight to the
host. Bytes move as 32-bit words when the row size allows, otherwise as bytes, so any pool
dtype (bf16, fp16, fp32, fp8) is copied bit-exactly.

References: `gather_blocks_ref` (index_select) and `scatter_blocks_ref` (index_copy_).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvtier.engine.kernels._launch import on_device

_CHUNK = 1024  # words per program


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, ids_ptr, row_words, GATHER: tl.constexpr, CHUNK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < row_words
    block = tl.load(ids_ptr + i).to(tl.int64)
    src_row = block if GATHER else i
    dst_row = i if GATHER else block
    x = tl.load(src_ptr + src_row * row_words + offs, mask=mask)
    tl.store(dst_ptr + dst_row * row_words + offs, x, mask=mask)


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as [blocks, bytes]: one row per block."""
    return t.view(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8)


def _word_aligned(rows: torch.Tensor) -> bool:
    return rows.shape[1] % 4 == 0 and rows.data_ptr() % 4 == 0


def _copy(src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor, gather: bool) -> None:
    for t, name in ((src, "source"), (dst, "destination")):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (each block one row), got strides {t.stride()}")
    src_rows, dst_rows = _byte_rows(src), _byte_rows(dst)
    if _word_aligned(src_rows) and _word_aligned(dst_rows):
        src_rows, dst_rows = src_rows.view(torch.int32), dst_rows.view(torch.int32)
    words = src_rows.shape[1]
    n = block_ids.shape[0]
    if n == 0 or words == 0:
        return
    with on_device(dst if dst.is_cuda else src):
        _copy_rows_kernel[(n, triton.cdiv(words, _CHUNK))](src_rows, dst_rows, block_ids, words,
                                                         GATHER=gather, CHUNK=_CHUNK)


def _check(pool: torch.Tensor, staging: torch.Tensor, block_ids: torch.Tensor) -> None:
    if staging.shape[1:] != pool.shape[1:] or staging.dtype != pool.dtype:
        raise ValueError(f"staging {staging.dtype} {tuple(staging.shape)} does not hold blocks of "
                         f"pool {pool.dtype} {tuple(pool.shape)}")
    if block_ids.dim() != 1 or block_ids.shape[0] > staging.shape[0]:
        raise ValueError(f"{block_ids.shape[0]} block ids for {staging.shape[0]} staging rows")


def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
    """staging[i] = pool[block_ids[i]] for every i; returns staging (allocated beside the pool
    when not given). Ids must be valid block indices (not checked on the device)."""
    if staging is None:
        staging = torch.empty((block_ids.shape[0], *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    _check(pool, staging, block_ids)
    _copy(pool, staging, block_ids, gather=True)
    return staging


def scatter_blocks(staging: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor) -> None:
    """pool[block_ids[i]] = staging[i] for every i (ids distinct; other blocks untouched)."""
    _check(pool, staging, block_ids)
    _copy(staging, pool, block_ids, gather=False)


def gather_blocks_ref(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    return pool.index_select(0, block_ids.long())


def scatter_blocks_ref(staging: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor) -> None:
    """index_copy_ over the blocks' bytes (torch has no CPU index_copy_ for fp8)."""
    _byte_rows(pool).index_copy_(0, block_ids.long(), _byte_rows(staging)[: block_ids.shape[0]])
