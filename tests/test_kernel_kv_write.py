"""The triton KV-write kernel against the engine's write_kv and the slot-mapping reference:
rows land in their (block, offset) slots of one layer's strided view, -1 slots are skipped,
nothing else in the pool changes. Interpreted (TRITON_INTERPRET=1) without a GPU."""

import pytest
import torch

from triton_setup import DEVICE  # noqa: E402,F401  (first: sets TRITON_INTERPRET before triton loads)

from kvtier.engine.attention.metadata import build_attention_metadata  # noqa: E402
from kvtier.engine.attention.paged_attention import write_kv  # noqa: E402
from kvtier.engine.kernels import interpreter_enabled  # noqa: E402
from kvtier.engine.kernels.attention_inputs import slot_mapping  # noqa: E402
from kvtier.engine.kernels.kv_write_triton import write_kv_ref, write_kv_slots  # noqa: E402



def pool_of(blocks=6, layers=3, page=16, kv_heads=2, head_dim=16, dtype=torch.float32):
    return torch.randn(blocks, layers, 2, page, kv_heads, head_dim, device=DEVICE).to(dtype)


@pytest.mark.parametrize("page", [16, 32])
def test_matches_engine_write_kv_for_a_mixed_step(page):
    specs = [(0, 5, [4]), (page - 1, 2, [0, 2]), (40, 1, [5, 1, 3])]  # crosses a block boundary
    meta = build_attention_metadata(specs, page, torch.device(DEVICE))
    pool = pool_of(page=page)
    k = torch.randn(8, 2, 16, device=DEVICE)
    v = torch.randn(8, 2, 16, device=DEVICE)
    want = pool.clone()
    write_kv(want[:, 1], k, v, meta)
    write_kv_slots(pool[:, 1], k, v, slot_mapping(meta))
    assert torch.equal(pool, want)  # the written slots, and every other byte untouched


def test_minus_one_slots_are_skipped():
    pool = pool_of(kv_heads=3, head_dim=24)  # neither a power of two
    before = pool.clone()
    slots = torch.tensor([17, -1, 0, 95, -1], dtype=torch.int32, device=DEVICE)
    k = torch.randn(5, 3, 24, device=DEVICE)
    v = torch.randn(5, 3, 24, device=DEVICE)
    want = pool.clone()
    write_kv_ref(want[:, 2], k, v, slots)
    write_kv_slots(pool[:, 2], k, v, slots)
    assert torch.equal(pool, want)
    assert torch.equal(pool[1, 2, 0, 1], k[0]) and torch.equal(pool[5, 2, 1, 15], v[3])
    changed = (pool != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [0, 1, 5]  # only the blocks of the three kept slots


def test_casts_to_the_pool_dtype():
    pool = pool_of(dtype=torch.bfloat16)
    slots = torch.tensor([3, 40], device=DEVICE)
    k = torch.randn(2, 2, 16, device=DEVICE)
    v = torch.randn(2, 2, 16, device=DEVICE)
    want = pool.clone()
    write_kv_ref(want[:, 0], k, v, slots)
    write_kv_slots(pool[:, 0], k, v, slots)
    if interpreter_enabled():
        # The interpreter (triton 3.9) truncates float32 -> bfloat16 where compiled code rounds
        # to nearest even, as torch does: here the written rows may differ by one bfloat16 ulp.
        torch.testing.assert_close(pool.float(), want.float(), rtol=2**-7, atol=0)
        untouched = torch.ones(pool.shape[:4], dtype=torch.bool, device=DEVICE)
        untouched[[0, 2], 0, :, [3, 8]] = False  # the two written slots, K and V
        assert torch.equal(pool[untouched], want[untouched])
    else:
        assert torch.equal(pool, want)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        write_kv_slots(pool_of()[:, 0], torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
def test_real_device_large_step():
    pool = pool_of(blocks=2048, layers=4, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    slots = torch.randperm(2048 * 16, device=DEVICE)[:4096]
    slots[::7] = -1
    k = torch.randn(4096, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(4096, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    want = pool.clone()
    write_kv_ref(want[:, 3], k, v, slots)
    write_kv_slots(pool[:, 3], k, v, slots)
    assert torch.equal(pool, want)
