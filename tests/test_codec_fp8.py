"""The fp8 codec: size, bounded round-trip error per (layer, k/v, head), header integration."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.kvstore.format.codec import HEADER_BYTES, CorruptBlock, decode_block, encode_block, get_codec
from kvtier.kvstore.keys import BlockKey

KEY = BlockKey(b"model-ns", b"\x07" * 32)
SHAPE = (4, 2, 16, 8, 64)  # [num_layers, 2, block_size, kv_heads, head_dim]


def head_amax(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax(dim=(2, 4), keepdim=True)


def roundtrip(x: torch.Tensor) -> torch.Tensor:
    return decode_block(encode_block(KEY, x, get_codec("fp8")), KEY)


def test_registered_by_name_and_id():
    codec = get_codec("fp8")
    assert codec.name == "fp8" and codec.codec_id == 1


@pytest.mark.parametrize("dtype, ratio", [(torch.bfloat16, 0.5), (torch.float16, 0.5), (torch.float32, 0.25)])
def test_payload_is_half_of_bf16_and_a_quarter_of_float32(dtype, ratio):
    x = torch.randn(SHAPE).to(dtype)
    raw = len(encode_block(KEY, x)) - HEADER_BYTES
    fp8 = len(encode_block(KEY, x, get_codec("fp8"))) - HEADER_BYTES
    scales = 4 * SHAPE[0] * SHAPE[1] * SHAPE[3]
    assert fp8 == raw * ratio + scales
    assert fp8 / raw < ratio * 1.01  # scales cost under 1% at this (small) block size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_bounded_per_head_and_dtype_restored(dtype):
    torch.manual_seed(0)
    # Heads with very different ranges: a per-block scale would flatten the quiet ones.
    spread = torch.logspace(-3, 2, SHAPE[3]).view(1, 1, 1, -1, 1)
    x = (torch.randn(SHAPE) * spread).to(dtype)
    y = roundtrip(x)
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.float() - x.float()).abs()
    # e4m3 rounding: <= 2^-4 of the element (normals), plus the output dtype's own rounding.
    dtype_eps = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    amax = head_amax(x)
    bound = (2**-4 + dtype_eps) * x.float().abs() + 2**-10 * amax / 448 + 1e-30
    assert (err <= bound * 1.0001).all()
    assert (err <= 2**-4 * amax * 1.0001).all()  # never worse than 2^-4 of the head's max
    # And the typical error is far below the bound.
    assert (err.mean(dim=(2, 4)) / head_amax(x).squeeze(2).squeeze(-1)).max() < 2**-6


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 3),
    block=st.integers(1, 8),
    heads=st.integers(1, 4),
    dim=st.integers(1, 16),
    scale=st.floats(1e-4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_error_bound_holds_for_any_shape_and_range(layers, block, heads, dim, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((layers, 2, block, heads, dim), generator=gen) * scale
    err = (roundtrip(x) - x).abs()
    assert (err <= 2**-4 * head_amax(x) * 1.0001 + 1e-30).all()


def test_zero_and_constant_heads_are_exact():
    x = torch.zeros(SHAPE)
    x[1, 0, :, 3, :] = 2.5  # a constant head maps onto e4m3's max exactly
    assert torch.equal(roundtrip(x), x)


def test_other_ranks_use_one_scale():
    x = torch.randn(3, 7, 5)
    err = (roundtrip(x) - x).abs()
    assert (err <= 2**-4 * x.abs().max()).all()
    assert torch.equal(roundtrip(torch.empty(2, 2, 0, 4, 8)), torch.empty(2, 2, 0, 4, 8))


def test_corrupt_fp8_value_is_rejected():
    value = bytearray(encode_block(KEY, torch.randn(SHAPE), get_codec("fp8")))
    value[HEADER_BYTES + 3] ^= 0x40  # inside the scales
    with pytest.raises(CorruptBlock):
        decode_block(bytes(value), KEY)
    with pytest.raises(CorruptBlock):
        get_codec("fp8").decode(memoryview(b"\0" * 10), torch.float32, SHAPE)
