"""KV write in triton: this step's new K/V rows into their pool slots, one program per token.

A slot is block * block_size + offset (the flat index `attention_inputs.slot_mapping` builds);
a slot of -1 means "no cache slot" (e.g. a padded token) and its row is skipped. Reference:
`write_kv_ref` below, itself checked against the engine's `write_kv`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.engine.kernels._launch import next_pow2, on_device


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kv_ptr, slots_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_b, stride_kv, stride_s, stride_h,
    num_kv_heads,
    PAGE: tl.constexpr, HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (h < num_kv_heads)[:, None] & (d < HEAD_DIM)[None, :]
    dst = kv_ptr + (slot // PAGE) * stride_b + (slot % PAGE) * stride_s + h[:, None] * stride_h + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv_slots(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv_layer: [num_blocks, 2, block_size, kv_heads, d] (e.g. `pool[:, layer]`);
    k, v: [T, kv_heads, d]; slots: [T] integer, -1 = skip. Casts to the pool's dtype."""
    tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or slots.shape != (tokens,) or kv_layer.shape[1] != 2 \
            or kv_layer.shape[3:] != (kv_heads, head_dim):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slots.shape)} "
                         f"do not fit KV layer {tuple(kv_layer.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError("k, v and the KV layer need a contiguous last (head_dim) dimension")
    if tokens == 0:
        return
    with on_device(kv_layer):
        _write_kv_kernel[(tokens,)](
            k, v, kv_layer, slots,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            kv_heads,
            PAGE=kv_layer.shape[2], HEADS_P=next_pow2(kv_heads), HEAD_DIM=head_dim,
            HEAD_DIM_P=next_pow2(head_dim),
        )


def write_kv_ref(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Torch reference: index assignment of the rows whose slot is not -1."""
    keep = slots >= 0
    slots = slots[keep].long()
    page = kv_layer.shape[2]
    blocks, offsets = slots // page, slots % page
    kv_layer[blocks, 0, offsets] = k[keep].to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = v[keep].to(kv_layer.dtype)
