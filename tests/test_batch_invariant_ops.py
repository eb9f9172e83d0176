"""The building blocks of deterministic mode against their plain torch references: the
row-invariant matmul (and its fallback plans), the exact element-wise functions, and the
invariant paged attention against `reference_attention`."""
import random

import pytest
import torch
import torch.nn.functional as F

from kvtier.engine.attention.invariant_attention import chunk_keys_for, invariant_attention
from kvtier.engine.attention.metadata import build_attention_metadata
from kvtier.engine.attention.paged_attention import reference_attention, write_kv
from kvtier.engine.layers.batch_invariant import ROW_TILE, InvariantMatmul, exact_silu, exact_softplus


@pytest.mark.parametrize("fn,exact", [(F.silu, exact_silu), (F.softplus, exact_softplus)])
def test_exact_elementwise_matches_torch_and_rounds_the_same_at_any_offset(fn, exact):
    x = torch.randn(70_001, generator=torch.Generator().manual_seed(0)) * 8
    whole = exact(x)
    assert torch.allclose(whole, fn(x), rtol=1e-5, atol=1e-6)
    for start, n in [(0, 1), (3, 7), (13, 17), (5, 33), (40_000, 9)]:  # vector body vs scalar tail
        assert torch.equal(exact(x[start : start + n].clone()), whole[start : start + n])


def test_invariant_linear_matches_f_linear_and_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(300, 64, generator=g)
    mm = InvariantMatmul()
    full = mm.linear(x, w, b)
    assert torch.allclose(full, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for lo, hi in [(0, 1), (7, 10), (100, 117), (299, 300), (0, 64)]:
        assert torch.equal(mm.linear(x[lo:hi].clone(), w, b), full[lo:hi])
    assert mm.strategies[("linear", 64, 96, torch.float32, "cpu")] in ("padded", "tiles", "rows")


def test_invariant_matmul_rows_do_not_depend_on_rows_or_batch_count():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(9, 40, 32, generator=g), torch.randn(9, 32, 48, generator=g)
    mm = InvariantMatmul()
    full = mm.matmul(a, b)
    assert torch.allclose(full, a @ b, rtol=1e-5, atol=1e-5)
    assert torch.equal(mm.matmul(a[3:4, 5:7].clone(), b[3:4]), full[3:4, 5:7])
    assert torch.equal(mm.matmul(a[:2, :3].clone(), b[:2]), full[:2, :3])
    with pytest.raises(ValueError, match="matmul"):
        mm.matmul(a[0], b[0])


def test_probe_falls_back_when_the_library_is_not_row_invariant():
    """An op whose rows depend on the row count gets tiles; one whose rows depend on their
    position gets row-by-row calls; both stay invariant after the fallback."""
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(4))

    def by_count(a):  # rows change with M: a BLAS that picks kernels by size
        return (F.linear(a[0], w) + 1e-3 * a.shape[1]).unsqueeze(0)

    def by_position(a):  # rows change with where they sit
        return (F.linear(a[0], w) + 1e-3 * torch.arange(a.shape[1])[:, None]).unsqueeze(0)

    for op, kind in [(by_count, "tiles"), (by_position, "rows")]:
        mm = InvariantMatmul()
        plan = mm._probe(("linear", 16, 8, torch.float32, "cpu"), torch.float32, torch.device("cpu"), False, op)
        assert plan.kind == kind
        run = (lambda t: mm._tiled(plan, t[None], t.new_empty(1, 0, 0), lambda r, _: op(r))[0])
        full = run(x)
        assert torch.equal(run(x[5:9].clone()), full[5:9])
        assert torch.equal(run(x[ROW_TILE - 1 : ROW_TILE + 2].clone()), full[ROW_TILE - 1 : ROW_TILE + 2])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("block_size", [16, 32])
def test_invariant_attention_matches_the_reference(heads, kv_heads, window, block_size):
    """Prefills from position 0, chunks over a cached prefix, and batched decodes, with the
    key chunk smaller than the contexts so the online softmax spans chunks."""
    rng = random.Random(heads * 10 + kv_heads + block_size)
    d, layers = 16, 2
    pool = torch.zeros(64, layers, 2, block_size, kv_heads, d)
    specs, next_block = [], 1
    for computed, new in [(0, 37), (40, 23), (70, 1), (95, 1), (1, 1), (200 // block_size * block_size, 9)]:
        need = -(-(computed + new) // block_size)
        specs.append((computed, new, list(range(next_block, next_block + need))))
        next_block += need
    total = sum(n for _, n, _ in specs)
    # Fill every slot the sequences' prefixes use, as earlier steps would have.
    pool[:, 1].normal_(generator=torch.Generator().manual_seed(rng.randrange(1000)))
    q = torch.randn(total, heads, d)
    k, v = torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)
    meta = build_attention_metadata(specs, block_size, torch.device("cpu"), window=window, invariant=[True] * len(specs))
    write_kv(pool[:, 1], k, v, meta)
    out = torch.full_like(q, float("nan"))
    invariant_attention(q, pool, 1, meta, d**-0.5, InvariantMatmul(), out, chunk_keys_for(block_size, 64))
    plain = build_attention_metadata(specs, block_size, torch.device("cpu"), window=window)
    ref = reference_attention(q, pool[:, 1], plain, d**-0.5)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
