"""Paged attention over the page-first KV pool.

Pool layout (docs/architecture.md §3): one pool per KV group,
`[num_blocks, layers_in_group, 2, block_size, num_kv_heads, head_dim]`; a layer sees its view
`kv[:, index_in_group]` of shape `[num_blocks, 2, block_size, kv_heads, head_dim]`. A layer
with a sliding window masks keys that left it (a query at p sees keys in (p - window, p]).

Two torch implementations live here (the `triton` one in kvtier.engine.kernels); the
backends of attention/backends/ pick one per engine and build its per-step metadata:
- `reference_attention`: per sequence, gather by block table, explicit causal mask with
  offset, float32 softmax. Slow and obviously correct; the oracle for every faster path.
- `sdpa_attention`: torch's scaled_dot_product_attention; prompts that start at position 0
  attend over their fresh K/V without touching the pool, decodes run as padded batches of similar lengths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.engine.attention.backends import get_backend
from kvtier.engine.attention.invariant_attention import invariant_attention
from kvtier.engine.attention.metadata import AttentionMetadata, SeqAttention, StepMetadata


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Scatter this step's K/V rows into their (block, offset) slots."""
    kv_layer[meta.slot_blocks, 0, meta.slot_offsets] = k.to(kv_layer.dtype)
    kv_layer[meta.slot_blocks, 1, meta.slot_offsets] = v.to(kv_layer.dtype)


def gather_kv(kv_layer: torch.Tensor, seq: SeqAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the keys [key_start, ctx_len) of one sequence, `[n, kv_heads, head_dim]` each.

    K and V are gathered separately through strided views, so each is copied exactly once.
    """
    n = seq.ctx_len - seq.key_start
    k = kv_layer[:, 0][seq.block_table].flatten(0, 1)[:n]
    v = kv_layer[:, 1][seq.block_table].flatten(0, 1)[:n]
    return k, v


def _causal_mask(q_len: int, ctx_len: int, device: torch.device, key_start: int = 0,
                 window: int | None = None) -> torch.Tensor:
    """True where query i (absolute position ctx_len - q_len + i) may see key j (absolute
    position key_start + j): causal, and inside the window when there is one."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
    k_pos = torch.arange(key_start, ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def reference_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, heads, d] -> [T, heads, d]. K/V for this step must already be written.
    Rows of deterministic sequences (`seq.invariant`) are left to the invariant path."""
    out = torch.empty_like(q) if out is None else out
    heads = q.shape[1]
    for seq in meta.seqs:
        if seq.invariant:
            continue
        k, v = gather_kv(kv_layer, seq)
        group = heads // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1)  # [ctx, heads, d]
        v = v.float().repeat_interleave(group, dim=1)
        qs = q[seq.q_start : seq.q_start + seq.q_len].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        mask = _causal_mask(seq.q_len, seq.ctx_len, q.device, seq.key_start, meta.window)
        scores = scores.masked_fill(~mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[seq.q_start : seq.q_start + seq.q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    layer_idx: int,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as `reference_attention`; k/v are this step's fresh rows."""
    num_layers = kv_pool.shape[1]
    kv_rows = kv_pool.view(kv_pool.shape[0] * num_layers * 2, -1)
    out = torch.empty_like(q) if out is None else out
    for seq in meta.prefill_seqs:
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, q, d]
        if seq.q_len == seq.ctx_len:  # whole context is new: no pool read
            ks, vs = k[rows], v[rows]
            if meta.window is None or seq.ctx_len <= meta.window:
                mask, causal = None, True
            else:
                mask, causal = _causal_mask(seq.q_len, seq.ctx_len, q.device, 0, meta.window), False
        else:
            kv = gather_rows(kv_rows, seq.block_table, layer_idx, num_layers).view(2, -1, *k.shape[1:])
            n = seq.ctx_len - seq.key_start
            ks, vs = kv[0, :n], kv[1, :n]
            mask, causal = _causal_mask(seq.q_len, seq.ctx_len, q.device, seq.key_start, meta.window), False
        o = F.scaled_dot_product_attention(
            qs,
            ks.to(q.dtype).transpose(0, 1).unsqueeze(0),
            vs.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o[0].transpose(0, 1)
    for d in meta.decodes:
        kv = gather_rows(kv_rows, d.block_tables, layer_idx, num_layers)
        out[d.rows] = _batched_decode(q[d.rows], kv, kv_pool.shape[-2], d, scale)
    return out


def gather_rows(kv_rows: torch.Tensor, block_ids: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
    """K and V of `block_ids` for one layer, `[2, n, block_size * kv_heads * head_dim]`.

    kv_rows is the pool viewed as one row per (block, layer, K|V): a single index_select
    copies whole contiguous rows, about 1.6x faster on the CPU than advanced indexing
    through strided layer views (benchmarks in the commit that introduced it).
    """
    base = block_ids.reshape(-1) * (2 * num_layers) + 2 * layer_idx
    return kv_rows.index_select(0, torch.cat((base, base + 1))).view(2, base.numel(), -1)


def _batched_decode(q: torch.Tensor, kv: torch.Tensor, kvh: int, d, scale: float) -> torch.Tensor:
    """One new token per sequence: q [B, heads, d] over padded, masked contexts.
    kv: this bucket's gathered K and V, `[2, B * max_blocks, block_size * kv_heads * d]`."""
    bsz, heads, hd = q.shape
    keys, values = kv.view(2, bsz, -1, kvh, hd).transpose(2, 3).to(q.dtype)  # [B, kvh, L, d] each
    # The query heads sharing one KV head become that head's rows: plain attention, no GQA
    # expansion of K/V (about 2x faster than enable_gqa on the CPU).
    qg = q.view(bsz, kvh, heads // kvh, hd)
    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=d.valid, scale=scale)
    return o.reshape(bsz, heads, hd)


class PagedAttention(torch.nn.Module):
    """Attention for one layer: writes this step's K/V into the pool, then attends."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, scale: float,
                 window: int | None = None):
        super().__init__()
        self.window = window
        self.group = 0  # KV group, set by bind_cache
        self.index_in_group = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = scale
        self.backend = "sdpa"  # a backend name (attention/backends/), set by bind_cache
        self.impl = get_backend(self.backend)
        self.kv_pool: torch.Tensor | None = None  # the whole page-first pool, bound by the engine
        self.kv_layer: torch.Tensor | None = None  # this layer's view of it
        # Deterministic mode (engine/determinism.py): the row-invariant matmul and key chunk.
        self.invariant = None
        self.chunk_keys = 0

    def bind_cache(self, pool: torch.Tensor, group: int, index_in_group: int, backend: str) -> None:
        """Attach this layer to its group's pool (engine/kv_cache/binding.py)."""
        self.kv_pool = pool
        self.kv_layer = pool[:, index_in_group]
        self.group = group
        self.index_in_group = index_in_group
        self.backend = backend
        self.impl = get_backend(backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepMetadata) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d] -> [T, heads, d]."""
        if self.kv_layer is None:
            raise RuntimeError("KV cache is not bound; call bind_kv_caches() before forward()")
        meta = step.groups[self.group]  # built by this backend's metadata builder
        self.impl.write_kv(self.kv_layer, k, v, meta)
        out = torch.empty_like(q)
        self.impl.attend(self, q, k, v, meta, out)
        if meta.invariant_seqs:  # deterministic rows: the invariant path, after (it may overwrite)
            if self.invariant is None:
                raise RuntimeError("deterministic requests need an engine started with deterministic=True")
            invariant_attention(q, self.kv_pool, self.index_in_group, meta, self.scale, self.invariant, out,
                                self.chunk_keys)
        return out
