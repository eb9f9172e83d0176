"""Unified paged attention in triton: prefill chunks and decodes of one step in one launch.

Reads K/V straight from the page-first pool through the block table (no contiguous copy).
One program owns (sequence, tile of BLOCK_Q query tokens, KV head, KV split): the query heads
that share the KV head are packed as extra rows of the tile (GQA), so every K/V tile is
loaded once for the whole group. Scores run through an online softmax in base 2.

Queries are the last q_len positions of ctx_len: query i sits at ctx_len - q_len + i and sees
keys at positions <= its own, and, with a window W, > its position - W. Row j of a block table
holds the key at key_start + j (sliding groups drop blocks before the window).

Long contexts with few sequences leave most of a GPU idle, so the key range can be cut into
`num_splits` pieces (flash-decoding): each piece writes its normalised partial output and
log-sum-exp, and a second kernel merges them. Reference: `paged_attention_ref` (below), which
runs the engine's `reference_attention` on the same inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.engine.attention.paged_attention import reference_attention
from kvtier.engine.kernels import interpreter_enabled
from kvtier.engine.kernels._launch import next_pow2, on_device
from kvtier.engine.kernels.attention_inputs import PagedAttentionInputs, to_metadata

_LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    q_ptr, kv_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    tables_ptr, cu_q_ptr, seq_lens_ptr, key_start_ptr,
    scale_log2, window, tiles_per_split, num_kv_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kv, stride_ks, stride_kh, stride_tab,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, PAGE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kvh = tl.program_id(2) % num_kv_heads
    split = tl.program_id(2) // num_kv_heads

    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    if q_tile * BLOCK_Q >= q_len:  # tiles are sized for the longest query of the step
        return
    ctx = tl.load(seq_lens_ptr + seq)
    k0 = tl.load(key_start_ptr + seq)

    # Row r of the tile: query token r // GROUP_P, query head kvh * GROUP + r % GROUP_P.
    rows = tl.arange(0, BLOCK_Q * GROUP_P)
    tok = q_tile * BLOCK_Q + rows // GROUP_P
    head = kvh * GROUP + rows % GROUP_P
    row_ok = (tok < q_len) & (rows % GROUP_P < GROUP)
    q_pos = ctx - q_len + tok
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys this tile can see, as offsets into the block table (key position - k0).
    first_pos = ctx - q_len + q_tile * BLOCK_Q
    hi = tl.minimum(first_pos + BLOCK_Q, ctx) - k0
    lo = hi * 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1 - k0, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    if NUM_SPLITS > 1:
        split_lo = split * tiles_per_split * BLOCK_N
        lo = tl.maximum(lo, split_lo)
        hi = tl.minimum(hi, split_lo + tiles_per_split * BLOCK_N)

    m_i = tl.full([BLOCK_Q * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P, HEAD_DIM_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        blk = tl.load(tables_ptr + seq * stride_tab + j // PAGE, mask=j_ok, other=0).to(tl.int64)
        base = blk * stride_kb + (j % PAGE) * stride_ks + kvh * stride_kh
        k = tl.load(kv_ptr + base[None, :] + d[:, None], mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(kv_ptr + stride_kv + base[:, None] + d[None, :],
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        k_pos = k0 + j
        visible = (k_pos[None, :] <= q_pos[:, None]) & j_ok[None, :]
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        if DOT_FP32:
            v = v.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    io_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part = split.to(tl.int64) * stride_ps + q_rows * stride_pt + head * stride_ph
        tl.store(part_out_ptr + part[:, None] + d[None, :], o, mask=io_mask)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(part_lse_ptr + split.to(tl.int64) * stride_ls + q_rows * stride_lt + head, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    """out[t, h] = sum_s w_s * part[s, t, h] with w_s = 2^lse_s / sum 2^lse (splits with no keys: 0)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    s_ok = s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + s * stride_ls + t * stride_lt + h, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_ok & (lse > float("-inf")), tl.math.exp2(lse - m), 0.0)
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    parts = tl.load(part_out_ptr + s[:, None] * stride_ps + t * stride_pt + h * stride_ph + d[None, :],
                    mask=(w > 0)[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_num_splits(num_tiles: int, max_seq_len: int, target_programs: int = 256,
                      min_keys_per_split: int = 512, max_splits: int = 32) -> int:
    """KV splits for a launch with `num_tiles` (sequence, query tile, KV head) programs: enough
    to fill about `target_programs`, while each split keeps at least `min_keys_per_split` keys
    (below that the merge costs more than the parallelism gains)."""
    if num_tiles <= 0 or num_tiles >= target_programs:
        return 1
    by_work = max(1, max_seq_len // min_keys_per_split)
    return max(1, min(-(-target_programs // num_tiles), by_work, max_splits))


def paged_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    inputs: PagedAttentionInputs,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_q: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """q: [T, heads, d]; kv_layer: [num_blocks, 2, block_size, kv_heads, d] (any strides with a
    contiguous last dim, e.g. `pool[:, layer]`); this step's K/V already written. Returns
    [T, heads, d] in q's dtype. `num_splits=None` picks one by `choose_num_splits`."""
    tokens, heads, head_dim = q.shape
    num_seqs = inputs.seq_lens.shape[0]
    _, two, page, kv_heads, kv_dim = kv_layer.shape
    if two != 2 or kv_dim != head_dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit KV layer {tuple(kv_layer.shape)}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot's minimum), got {block_n}")
    if q.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError("q and the KV layer need a contiguous last (head_dim) dimension")
    out = torch.empty_like(q) if out is None else out
    if tokens == 0 or num_seqs == 0:
        return out
    group = heads // kv_heads
    group_p = next_pow2(group)
    if block_q is None:  # at least 16 rows (tl.dot's minimum), at most 64 unless the group is wider
        block_q = min(next_pow2(inputs.max_q_len), max(1, 64 // group_p))
        block_q = max(block_q, 16 // group_p if group_p < 16 else 1)
    q_tiles = _cdiv(inputs.max_q_len, block_q)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * q_tiles * kv_heads, inputs.max_seq_len)
    tiles_per_split = max(1, _cdiv(_cdiv(inputs.max_seq_len, block_n), num_splits))
    if num_splits > 1:
        part_out = torch.empty(num_splits, tokens, heads, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_splits, tokens, heads, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel when there is one split
    window = inputs.window or 0
    fp32 = q.dtype == torch.float32
    # The interpreter multiplies bfloat16 operands of tl.dot as raw 16-bit integers (triton 3.9),
    # so interpreted bfloat16 runs do their products in float32; compiled runs keep bfloat16.
    dot_fp32 = fp32 or (q.dtype == torch.bfloat16 and interpreter_enabled())
    with on_device(q):
        _attention_kernel[(num_seqs, q_tiles, kv_heads * num_splits)](
            q, kv_layer, out, part_out, part_lse,
            inputs.block_tables, inputs.cu_seqlens_q, inputs.seq_lens, inputs.key_start,
            scale * _LOG2E, window, tiles_per_split, kv_heads,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            inputs.block_tables.stride(0),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=block_n,
            HEAD_DIM=head_dim, HEAD_DIM_P=max(16, next_pow2(head_dim)), PAGE=page,
            NUM_SPLITS=num_splits, USE_WINDOW=window > 0, DOT_PRECISION="ieee" if fp32 else "tf32",
            DOT_FP32=dot_fp32,
        )
        if num_splits > 1:
            _merge_splits_kernel[(tokens, heads)](
                part_out, part_lse, out,
                part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
                part_lse.stride(1), out.stride(0), out.stride(1),
                NUM_SPLITS=num_splits, SPLITS_P=next_pow2(num_splits),
                HEAD_DIM=head_dim, HEAD_DIM_P=max(16, next_pow2(head_dim)),
            )
    return out


def paged_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor, inputs: PagedAttentionInputs,
                        scale: float) -> torch.Tensor:
    """The oracle: the engine's per-sequence `reference_attention` on the same inputs."""
    return reference_attention(q, kv_layer, to_metadata(inputs, kv_layer.shape[2]), scale)
