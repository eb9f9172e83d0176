"""fp8 block quantize / dequantize kernels: bit-exact with the fp8 codec (kvstore/format/fp8.py)
and with the batched torch reference, including round-to-nearest-even ties, carries into the
next power of two, subnormals, zero heads and negative zero. Interpreted without a GPU."""

import pytest
import torch

from triton_setup import DEVICE  # noqa: E402,F401  (first: sets TRITON_INTERPRET before triton loads)

from kvtier.engine.kernels import interpreter_enabled  # noqa: E402
from kvtier.engine.kernels.fp8_triton import (  # noqa: E402
    dequantize_blocks_fp8,
    dequantize_blocks_fp8_ref,
    quantize_blocks_fp8,
    quantize_blocks_fp8_ref,
)
from kvtier.kvstore.format.fp8 import Fp8Codec  # noqa: E402

SHAPE = (6, 2, 2, 16, 4, 32)  # [num_blocks, layers, 2, block_size, kv_heads, head_dim]


def spread_pool(dtype=torch.float32, shape=SHAPE, seed=0):
    """Heads whose ranges differ by 10^5, as outlier heads do; one all-zero head."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-3, 2, shape[4]).view(1, 1, 1, 1, -1, 1)
    x = torch.randn(shape, generator=gen) * spread
    x[1, 0, 1, :, 2] = 0.0
    x[1, 0, 1, 3, 2, 5] = -0.0
    return x.to(dtype).to(DEVICE)


def bits(t):
    return t.view(torch.uint8)


def test_every_tie_and_carry_rounds_like_torch():
    """All e4m3 values, the midpoints between neighbours (ties) and points just around them,
    placed in one head whose max is exactly 448 so the scale is 1 and x / scale == x."""
    codes = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), grid, -0.0 * grid[:1]])
    values = torch.cat([near, torch.randn(4096) * 50]).clamp(-448, 448)
    per_block = 16 * 32
    n = -(-values.numel() // per_block)
    x = torch.zeros(n * per_block)
    x[: values.numel()] = values
    pool = x.view(n, 1, 1, 16, 1, 32).expand(n, 1, 2, 16, 1, 32).contiguous()
    pool[:, 0, :, 0, 0, 0] = 448.0  # pin every head's max
    pool = pool.to(DEVICE)
    ids = torch.arange(n, device=DEVICE)
    q, scales = quantize_blocks_fp8(pool, ids)
    assert torch.equal(scales, torch.ones_like(scales))
    want = pool.cpu().to(torch.float8_e4m3fn)
    assert torch.equal(bits(q.cpu()), bits(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_the_codec_payload_byte_for_byte(dtype):
    pool = spread_pool(dtype)
    ids = torch.tensor([4, 1, 0], device=DEVICE)
    q, scales = quantize_blocks_fp8(pool, ids)
    codec = Fp8Codec()
    for i, block in enumerate(ids.tolist()):
        payload = scales[i].cpu().numpy().tobytes() + bits(q[i]).cpu().numpy().tobytes()
        assert payload == codec.encode(pool[block])
    ref_q, ref_scales = quantize_blocks_fp8_ref(pool, ids)
    assert torch.equal(bits(q), bits(ref_q)) and torch.equal(scales, ref_scales)
    assert torch.equal(scales[1, 0, 1, 2], torch.tensor(1.0, device=DEVICE))  # the zero head
    assert bits(q[1, 0, 1, 3, 2, 5]).item() == 0x80  # negative zero kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_pool_matches_the_codec(dtype):
    src = spread_pool(torch.float32, seed=1)
    q, scales = quantize_blocks_fp8(src, torch.arange(SHAPE[0], device=DEVICE))
    pool = torch.zeros(SHAPE, dtype=dtype, device=DEVICE)
    ids = torch.tensor([5, 2, 3], device=DEVICE)
    dequantize_blocks_fp8(q, scales, pool, ids)
    codec = Fp8Codec()
    want = torch.zeros_like(pool)
    for i, block in enumerate(ids.tolist()):
        payload = scales[i].cpu().numpy().tobytes() + bits(q[i]).cpu().numpy().tobytes()
        want[block] = codec.decode(memoryview(payload), dtype, tuple(SHAPE[1:])).to(DEVICE)
    ref = torch.zeros_like(pool)
    dequantize_blocks_fp8_ref(q, scales, ref, ids)
    assert torch.equal(want, ref)
    if dtype == torch.bfloat16 and interpreter_enabled():
        # The interpreter truncates float32 -> bfloat16 (compiled code rounds to nearest even):
        # within one bfloat16 ulp here, bit-exact on a GPU.
        torch.testing.assert_close(pool.float(), want.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(bits(pool), bits(want))
    assert not pool[[0, 1, 4]].any()  # blocks not named are untouched


def test_roundtrip_error_bounded_per_head():
    x = spread_pool(torch.float32, seed=2)
    ids = torch.arange(SHAPE[0], device=DEVICE)
    q, scales = quantize_blocks_fp8(x, ids)
    y = torch.empty_like(x)
    dequantize_blocks_fp8(q, scales, y, ids)
    amax = x.abs().amax(dim=(3, 5), keepdim=True)
    assert ((y - x).abs() <= 2**-4 * amax * 1.0001).all()


def test_rejects_mismatched_scales():
    pool = spread_pool()
    q, scales = quantize_blocks_fp8(pool, torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError):
        dequantize_blocks_fp8(q, scales[:, :1], pool, torch.tensor([0], device=DEVICE))


@pytest.mark.gpu
def test_real_device_many_blocks_bit_exact():
    pool = spread_pool(torch.bfloat16, shape=(1024, 8, 2, 16, 8, 128))
    ids = torch.randperm(1024, device=DEVICE)[:300]
    q, scales = quantize_blocks_fp8(pool, ids)
    ref_q, ref_scales = quantize_blocks_fp8_ref(pool, ids)
    assert torch.equal(bits(q), bits(ref_q)) and torch.equal(scales, ref_scales)
    got = torch.zeros_like(pool)
    want = torch.zeros_like(pool)
    dequantize_blocks_fp8(q, scales, got, ids)
    dequantize_blocks_fp8_ref(q, scales, want, ids)
    assert torch.equal(bits(got), bits(want))
