"""Batch-invariant paged attention for deterministic mode (docs/determinism.md).

A query's output must be the same bits whether it is a decode in a batch of 30, one row of
a 2000-token prefill, or a recompute after preemption, and whether its keys were computed
in this step, earlier, or loaded from a tier. So:

- Keys are always read from the pool (this step's K/V are written first), so fresh and
  cached keys go through one path.
- The reduction over keys runs over fixed chunks of `chunk_keys` keys aligned to absolute
  positions (chunk c holds keys [c * chunk_keys, (c + 1) * chunk_keys)), with an online
  softmax carried from chunk to chunk in increasing order. A key always lands in the same
  chunk at the same offset. Chunks a query cannot see (past its position, before its window,
  or beyond another sequence's length in a batch) add exact zeros and scale by exactly 1, so
  how many of them a step happens to process changes nothing.
- Both products go through `InvariantMatmul`, whose rows are independent of the row count;
  a query's rows (the query heads sharing one KV head) are padded the same way whatever
  else shares the call.

Computed in float32 whatever the model dtype. Slower than SDPA; only deterministic
requests take it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.engine.attention.metadata import AttentionMetadata, SeqAttention
from kvtier.engine.layers.batch_invariant import InvariantMatmul

DEFAULT_CHUNK_KEYS = 128


def chunk_keys_for(block_size: int, chunk_keys: int = DEFAULT_CHUNK_KEYS) -> int:
    """The fixed chunk: a whole number of blocks, at least one."""
    return max(block_size, chunk_keys // block_size * block_size)


@dataclass
class _Chunk:
    """One key chunk of one unit: what every layer reads the same way."""

    rows: slice  # the unit's query rows that see some key of this chunk
    block_rows: torch.Tensor  # [U * blocks per chunk] pool rows of K in layer 0 (V is the next row)
    hidden: torch.Tensor  # [U, 1, rows, keys] True where a query row must not see the key


@dataclass
class _Unit:
    """One prefill, or all decodes of the step batched together."""

    q_rows: torch.Tensor  # [U * q_len] rows of the flat batch, unit-major
    units: int
    q_len: int
    chunks: list[_Chunk]


def invariant_attention(q: torch.Tensor, kv_pool: torch.Tensor, layer_idx: int, meta: AttentionMetadata,
                        scale: float, matmul: InvariantMatmul, out: torch.Tensor, chunk_keys: int) -> None:
    """Fill the rows of `meta.invariant_seqs` in `out` (q: [T, heads, d]). The per-step plan
    (block rows and masks, the same for every layer) is built by the first layer and kept on `meta`."""
    if meta.invariant_plan is None:
        group = q.shape[1] // kv_pool.shape[-2]
        meta.invariant_plan = _plan(meta.invariant_seqs, meta.block_size, meta.window, chunk_keys,
                                    kv_pool.shape[1], group, q.device)
    for unit in meta.invariant_plan:
        _attend(q, kv_pool, layer_idx, unit, scale, matmul, out, chunk_keys)


def _plan(seqs: list[SeqAttention], block_size: int, window: int | None, chunk_keys: int, num_layers: int,
          group: int, device: torch.device) -> list[_Unit]:
    decodes = [s for s in seqs if s.q_len == 1]
    batches = ([decodes] if decodes else []) + [[s] for s in seqs if s.q_len > 1]
    return [_plan_unit(b, block_size, window, chunk_keys, num_layers, group, device) for b in batches]


def _plan_unit(seqs, block_size, window, chunk_keys, num_layers, group, device) -> _Unit:
    units, q_len = len(seqs), seqs[0].q_len
    # Absolute block table: entry j holds absolute block j, -1 where unreadable (before a
    # sliding table's start, or past the end).
    starts = [s.key_start // block_size for s in seqs]
    tables = torch.full((units, max(f + len(s.block_table) for f, s in zip(starts, seqs))), -1,
                        dtype=torch.long, device=device)
    for i, (first, s) in enumerate(zip(starts, seqs)):
        tables[i, first : first + len(s.block_table)] = s.block_table
    ctx = torch.tensor([s.ctx_len for s in seqs], device=device)
    q_pos = ctx[:, None] - q_len + torch.arange(q_len, device=device)[None, :]  # [U, q_len], ascending
    first_pos = seqs[0].ctx_len - q_len
    per_chunk = chunk_keys // block_size
    chunks = []
    for c in range(min(s.key_start for s in seqs) // chunk_keys, (max(s.ctx_len for s in seqs) - 1) // chunk_keys + 1):
        lo_pos = c * chunk_keys
        # Query tokens that can see some key of this chunk (all of them for decodes); the
        # others would only add exact zeros (module doc), so skipping them changes no bits.
        t0, t1 = 0, q_len
        if units == 1:
            t0 = min(q_len, max(0, lo_pos - first_pos))
            if window is not None:
                t1 = max(t0, min(q_len, lo_pos + chunk_keys - 1 + window - first_pos))
        if t0 == t1:
            continue
        ids = tables[:, c * per_chunk : (c + 1) * per_chunk]
        if ids.shape[1] < per_chunk:
            ids = torch.cat([ids, ids.new_full((units, per_chunk - ids.shape[1]), -1)], dim=1)
        k_pos = lo_pos + torch.arange(chunk_keys, device=device)
        pos = q_pos[:, t0:t1, None]
        visible = (ids >= 0).repeat_interleave(block_size, dim=1)[:, None, :] & (k_pos <= pos)
        if window is not None:
            visible &= k_pos > pos - window
        hidden = ~visible.repeat_interleave(group, dim=1)[:, None]  # one mask row per query row
        chunks.append(_Chunk(slice(t0 * group, t1 * group), ids.clamp(min=0).reshape(-1) * (2 * num_layers), hidden))
    q_rows = torch.tensor([s.q_start + i for s in seqs for i in range(q_len)], device=device)
    return _Unit(q_rows, units, q_len, chunks)


def _attend(q, kv_pool, layer_idx, unit: _Unit, scale, matmul, out, chunk_keys) -> None:
    device = q.device
    _, heads, head_dim = q.shape
    num_layers, kv_heads = kv_pool.shape[1], kv_pool.shape[-2]
    group = heads // kv_heads
    units, q_len = unit.units, unit.q_len
    rows = q_len * group
    # Queries as [U, kv_heads, rows, d]: row r of a KV head is token r // group, head r % group.
    qs = q.index_select(0, unit.q_rows).float().view(units, q_len, kv_heads, group, head_dim)
    qs = qs.transpose(1, 2).reshape(units, kv_heads, rows, head_dim)
    kv_rows = kv_pool.view(kv_pool.shape[0] * num_layers * 2, -1)

    running_max = torch.full((units, kv_heads, rows, 1), float("-inf"), device=device)
    total = torch.zeros(units, kv_heads, rows, 1, device=device)
    acc = torch.zeros(units, kv_heads, rows, head_dim, device=device)
    for chunk in unit.chunks:
        base = chunk.block_rows + 2 * layer_idx
        k = kv_rows.index_select(0, base).view(units, chunk_keys, kv_heads, head_dim)
        v = kv_rows.index_select(0, base + 1).view(units, chunk_keys, kv_heads, head_dim)
        r = chunk.rows
        # One product per KV head: a head's K is a strided view the BLAS call reads as it is,
        # where one call over all heads would first copy K into head-major order.
        q_r = qs[:, :, r]
        scores = torch.stack([matmul.matmul(q_r[:, h], k[:, :, h].float().transpose(1, 2)) for h in range(kv_heads)],
                             dim=1)  # [U, kvh, rows, keys]
        scores.mul_(scale).masked_fill_(chunk.hidden, float("-inf"))
        row_max, row_total, row_acc = running_max[:, :, r], total[:, :, r], acc[:, :, r]  # views
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
        # A row that has seen nothing yet keeps max -inf; subtract 0 there so exp gives 0, not nan.
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        probs = scores.sub_(shift).exp_()
        rescale = row_max.sub_(shift).exp_()
        row_total.mul_(rescale).add_(probs.sum(dim=-1, keepdim=True))
        pv = torch.stack([matmul.matmul(probs[:, h], v[:, :, h].float()) for h in range(kv_heads)], dim=1)
        row_acc.mul_(rescale).add_(pv)
        row_max.copy_(new_max)
    result = (acc / total).view(units, kv_heads, q_len, group, head_dim).transpose(1, 2)
    out.index_copy_(0, unit.q_rows, result.reshape(units * q_len, heads, head_dim).to(out.dtype))
