"""copy_block / clone_block (kvstore/host_copy.py) against torch's copy_ and clone."""
from __future__ import annotations

import pytest
import torch

from kvtier.kvstore.host_copy import clone_block, copy_block


def _pairs():
    g = torch.Generator().manual_seed(0)
    block = torch.randn(4, 2, 16, 2, 8, generator=g)
    yield "contiguous", torch.empty_like(block), block
    yield "bf16", torch.empty(3, 5, dtype=torch.bfloat16), torch.randn(3, 5, generator=g).bfloat16()
    yield "strided source", torch.empty(8, 4), torch.randn(4, 8, generator=g).t()
    yield "strided destination", torch.empty(6, 4).t(), torch.randn(4, 6, generator=g)
    yield "dtype conversion", torch.empty(3, 4, dtype=torch.float16), torch.randn(3, 4, generator=g)
    yield "broadcast", torch.empty(3, 4), torch.randn(4, generator=g)
    yield "a slot of a pool", torch.zeros(5, 64)[2], torch.randn(64, generator=g)


@pytest.mark.parametrize("name, dst, src", list(_pairs()), ids=[p[0] for p in _pairs()])
def test_copy_block_equals_copy_(name, dst, src):
    expected = dst.clone().copy_(src)
    copy_block(dst, src)
    assert torch.equal(dst, expected)


def test_copy_block_writes_only_its_slot():
    pool = torch.zeros(5, 64)
    copy_block(pool[2], torch.ones(64))
    assert pool[2].eq(1).all() and pool[[0, 1, 3, 4]].eq(0).all()


@pytest.mark.parametrize("src", [torch.randn(2, 3, 4), torch.randn(4, 6).t(), torch.randn(3, dtype=torch.float64)])
def test_clone_block_is_a_private_equal_copy(src):
    copy = clone_block(src)
    assert torch.equal(copy, src) and copy.dtype == src.dtype and copy.is_contiguous()
    src.add_(1)  # the copy does not share the source's memory
    assert not torch.equal(copy, src)
