"""fp8 (e4m3fn) quantize / dequantize of whole KV blocks on the device, per-head scales.

Serves the `fp8` codec (kvstore/format/fp8.py) on the device: for each block
`[layers, 2, block_size, kv_heads, head_dim]` the scale of (layer, k|v, head) is
max|x| / 448 over (block_size, head_dim), 1 for an all-zero head, and the stored byte is
round-to-nearest-even(clamp(x / scale, -448, 448)) in e4m3fn. One program per
(block, layer, k|v, head). Quantize reads its blocks straight from the pool by id (fused
gather); dequantize writes straight into the pool by id (fused scatter).

Bit-exact with the codec for finite inputs: the division is IEEE (div_rn), and the float32 ->
e4m3 rounding is done with integer arithmetic rather than triton's cast, because the
interpreter's cast (triton 3.9) drops the carry when rounding up crosses a power of two
(124.3 became 64) and GPUs before sm_89 have no e4m3 conversion instruction. The bytes are
stored through a uint8 view, so no fp8 pointer type is needed either.
For one block i, `scales[i]` (float32 bytes) followed by `q[i]` (e4m3 bytes) is exactly the
codec's payload. Non-finite inputs are not matched (KV caches hold none).

References: `quantize_blocks_fp8_ref` / `dequantize_blocks_fp8_ref`, the codec's math in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.engine.kernels._launch import next_pow2, on_device
from kvtier.kvstore.format.fp8 import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)  # compiled kernels read module globals only as constexpr


@triton.jit
def _e4m3_bits(y):
    """float32 in [-448, 448] -> e4m3fn byte, round to nearest even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a_bits = bits & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    # Normal range (>= 2^-6): keep 3 of the 23 mantissa bits, rounding half to even; a carry
    # out of the mantissa bumps the exponent, as it should. Rebias the exponent 127 -> 7.
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormals are multiples of 2^-9: round a * 2^9 (exact) to an integer, half to even;
    # 8 is the smallest normal's encoding, so rounding up into the normal range is right too.
    v = a * 512.0
    t = v.to(tl.int32)
    frac = v - t.to(tl.float32)
    sub = t + ((frac > 0.5) | ((frac == 0.5) & ((t & 1) == 1))).to(tl.int32)
    mag = tl.where(a < 0.015625, sub, normal)
    return (mag | (sign << 7)).to(tl.uint8)


@triton.jit
def _e4m3_value(byte):
    """e4m3fn byte -> float32 (exact; 0x7f/0xff, the NaN codes, are never produced)."""
    b = byte.to(tl.int32)
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    # The sign as a bit: compiled triton negates as 0 - x, which turns -0.0 into +0.0.
    return (val.to(tl.int32, bitcast=True) | ((b >> 7) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_kernel(
    src_ptr, ids_ptr, q_ptr, scale_ptr,
    stride_sb, stride_qb, stride_slot, kv_heads,
    PAGE: tl.constexpr, PAGE_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    lk = tl.program_id(1)  # layer * 2 + k|v
    h = tl.program_id(2)
    block = tl.load(ids_ptr + i).to(tl.int64)
    s = tl.arange(0, PAGE_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (s < PAGE)[:, None] & (d < HEAD_DIM)[None, :]
    inner = lk * PAGE * stride_slot + s[:, None] * stride_slot + h * HEAD_DIM + d[None, :]
    x = tl.load(src_ptr + block * stride_sb + inner, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.math.div_rn(amax, _FP8_MAX)
    scale = tl.where(scale > 0, scale, 1.0)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -_FP8_MAX), _FP8_MAX)
    tl.store(q_ptr + i * stride_qb + inner, _e4m3_bits(y), mask=mask)
    tl.store(scale_ptr + (i * tl.num_programs(1) + lk) * kv_heads + h, scale)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, ids_ptr, dst_ptr,
    stride_qb, stride_db, stride_slot, kv_heads,
    PAGE: tl.constexpr, PAGE_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    lk = tl.program_id(1)
    h = tl.program_id(2)
    block = tl.load(ids_ptr + i).to(tl.int64)
    s = tl.arange(0, PAGE_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (s < PAGE)[:, None] & (d < HEAD_DIM)[None, :]
    inner = lk * PAGE * stride_slot + s[:, None] * stride_slot + h * HEAD_DIM + d[None, :]
    scale = tl.load(scale_ptr + (i * tl.num_programs(1) + lk) * kv_heads + h)
    x = _e4m3_value(tl.load(q_ptr + i * stride_qb + inner, mask=mask, other=0)) * scale
    tl.store(dst_ptr + block * stride_db + inner, x.to(dst_ptr.dtype.element_ty), mask=mask)


def _grid_and_meta(blocks: torch.Tensor, n: int):
    _, layers, two, page, kv_heads, head_dim = blocks.shape
    if two != 2:
        raise ValueError(f"expected blocks [n, layers, 2, block_size, kv_heads, head_dim], got {tuple(blocks.shape)}")
    if not blocks.is_contiguous():
        raise ValueError("the pool / staging buffer must be contiguous")
    meta = dict(PAGE=page, PAGE_P=next_pow2(page), HEAD_DIM=head_dim, HEAD_DIM_P=next_pow2(head_dim))
    return (n, layers * 2, kv_heads), meta, kv_heads * head_dim, kv_heads


def quantize_blocks_fp8(pool: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pool: [num_blocks, layers, 2, block_size, kv_heads, head_dim] (any float dtype);
    returns (q [n, layers, 2, block_size, kv_heads, head_dim] float8_e4m3fn,
    scales [n, layers, 2, kv_heads] float32) for the n blocks in block_ids."""
    n = block_ids.shape[0]
    q = torch.empty((n, *pool.shape[1:]), dtype=torch.float8_e4m3fn, device=pool.device)
    scales = torch.empty((n, pool.shape[1], 2, pool.shape[4]), dtype=torch.float32, device=pool.device)
    grid, meta, stride_slot, kv_heads = _grid_and_meta(pool, n)
    if n and q.numel():
        with on_device(pool):
            _quantize_kernel[grid](pool, block_ids, q.view(torch.uint8), scales,
                                   pool.stride(0), q.stride(0), stride_slot, kv_heads, **meta)
    return q, scales


def dequantize_blocks_fp8(q: torch.Tensor, scales: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor) -> None:
    """pool[block_ids[i]] = q[i] * scales[i] (broadcast per layer, k|v, head), in the pool's dtype."""
    n = block_ids.shape[0]
    if q.dtype != torch.float8_e4m3fn or q.shape[1:] != pool.shape[1:] or q.shape[0] < n \
            or scales.shape != (q.shape[0], q.shape[1], 2, q.shape[4]) or scales.dtype != torch.float32:
        raise ValueError(f"q {q.dtype} {tuple(q.shape)} / scales {tuple(scales.shape)} "
                         f"do not fit pool {tuple(pool.shape)}")
    grid, meta, stride_slot, kv_heads = _grid_and_meta(pool, n)
    if n and q.numel():
        with on_device(pool):
            _dequantize_kernel[grid](q.view(torch.uint8), scales.contiguous(), block_ids, pool,
                                     q.stride(0), pool.stride(0), stride_slot, kv_heads, **meta)


def quantize_blocks_fp8_ref(pool: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codec's encode math (kvstore/format/fp8.py), batched over blocks."""
    x = pool.index_select(0, block_ids.long()).float()
    amax = x.abs().amax(dim=(3, 5), keepdim=True)  # over block_size and head_dim
    # A tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal, which
    # can differ from the codec's (CPU) quotient in the last bit.
    scale = amax / torch.full_like(amax, FP8_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.squeeze(5).squeeze(3).contiguous()


def dequantize_blocks_fp8_ref(q: torch.Tensor, scales: torch.Tensor, pool: torch.Tensor,
                              block_ids: torch.Tensor) -> None:
    n = block_ids.shape[0]
    x = (q[:n].float() * scales[:n, :, :, None, :, None]).to(pool.dtype)
    pool[block_ids.long()] = x
