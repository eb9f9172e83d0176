"""Batch-invariant paged attention for deterministic mode (docs/determinism.md).

A query's output must be the same bits whether it is a decode in a batch of 30, one row of
a 2000-token prefill, or a recompute after preemption, and whether its keys were computed
in this step, earlier, or loaded from a tier. So:

- Keys are always read from the pool (this step's K/V are written first), so fresh and
  cached keys go through one path.
- Keys are cut into fixed chunks of `chunk_keys` aligned to absolute positions (chunk c
  holds keys [c * chunk_keys, (c + 1) * chunk_keys)), so a key always lands in the same
  chunk at the same offset. A query's softmax takes the max over all keys it sees (exact in
  any order), sums each chunk over its fixed length, and adds the chunk sums, and the
  chunks' probability-weighted values, with a sequential scan (`cumsum`) in chunk order.
  Chunks a query cannot see (past its position, before its window, or beyond another
  sequence's length in a batch) hold exact zeros, and a sequential sum is unchanged by
  zeros before or after, so how many of them a step happens to process changes nothing.
  (A plain `sum` over the chunk axis is not enough: its unrolled accumulators change with
  where the first chunk sits.)
- All products go through `InvariantMatmul`, one batch entry per (sequence, chunk) of one
  KV head, with the query heads sharing that KV head as rows: every call has the same
  inner shapes, and rows do not depend on how many rows or entries share the call.

Computed in float32 whatever the model dtype. Slower than SDPA; only deterministic
requests take it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.engine.attention.metadata import AttentionMetadata, SeqAttention
from kvtier.engine.layers.batch_invariant import InvariantMatmul

DEFAULT_CHUNK_KEYS = 128
PREFILL_BLOCK_TOKENS = 128  # a long prefill's queries run in blocks, bounding the score memory


def chunk_keys_for(block_size: int, chunk_keys: int = DEFAULT_CHUNK_KEYS) -> int:
    """The fixed chunk: a whole number of blocks, at least one."""
    return max(block_size, chunk_keys // block_size * block_size)


@dataclass
class _Block:
    """Query tokens [t0, t1) of a unit against the key chunks they can see: the same for
    every layer, so it is planned once per step."""

    rows: slice  # query rows (token * group + head) of the unit
    chunks: int  # C: key chunks read
    block_rows: torch.Tensor  # [U * C * blocks per chunk] pool rows of K in layer 0 (V is the next row)
    hidden: torch.Tensor  # [1, U, C, rows, keys] True where a query row must not see the key


@dataclass
class _Unit:
    """One prefill, or all decodes of the step batched together."""

    q_rows: torch.Tensor  # [U * q_len] rows of the flat batch, unit-major
    units: int
    q_len: int
    blocks: list[_Block]


def invariant_attention(q: torch.Tensor, kv_pool: torch.Tensor, layer_idx: int, meta: AttentionMetadata,
                        scale: float, matmul: InvariantMatmul, out: torch.Tensor, chunk_keys: int) -> None:
    """Fill the rows of `meta.invariant_seqs` in `out` (q: [T, heads, d]). The per-step plan
    is built by the first layer and kept on `meta`."""
    if meta.invariant_plan is None:
        group = q.shape[1] // kv_pool.shape[-2]
        meta.invariant_plan = _plan(meta.invariant_seqs, meta.block_size, meta.window, chunk_keys,
                                    kv_pool.shape[1], group, q.device)
    for unit in meta.invariant_plan:
        _attend(q, kv_pool, layer_idx, unit, scale, matmul, out, chunk_keys)


def _plan(seqs: list[SeqAttention], block_size: int, window: int | None, chunk_keys: int, num_layers: int,
          group: int, device: torch.device) -> list[_Unit]:
    """Decodes batched by how many key chunks they read (so short ones do not gather the
    long ones' padding), then each prefill on its own."""
    by_chunks: dict[int, list[SeqAttention]] = {}
    for s in seqs:
        if s.q_len == 1:
            c0, c1 = _chunk_range(s, s.ctx_len - 1, s.ctx_len - 1, window, chunk_keys)
            by_chunks.setdefault(c1 - c0, []).append(s)
    batches = list(by_chunks.values()) + [[s] for s in seqs if s.q_len > 1]
    return [_plan_unit(b, block_size, window, chunk_keys, num_layers, group, device) for b in batches]


def _chunk_range(s: SeqAttention, first_pos: int, last_pos: int, window: int | None,
                 chunk_keys: int) -> tuple[int, int]:
    """The key chunks [c0, c1) that queries at positions [first_pos, last_pos] of `s` can see."""
    lowest = 0 if window is None else max(0, first_pos - window + 1)
    return max(lowest, s.key_start) // chunk_keys, last_pos // chunk_keys + 1


def _plan_unit(seqs, block_size, window, chunk_keys, num_layers, group, device) -> _Unit:
    units, q_len = len(seqs), seqs[0].q_len
    per_chunk = chunk_keys // block_size
    step = PREFILL_BLOCK_TOKENS if units == 1 else q_len
    blocks = []
    for t0 in range(0, q_len, step):
        t1 = min(q_len, t0 + step)
        # Each sequence reads from its own first chunk, so chunk i of the batch is a different
        # absolute chunk per sequence; a key still sits at its absolute chunk and offset.
        ranges = [_chunk_range(s, s.ctx_len - q_len + t0, s.ctx_len - q_len + t1 - 1, window, chunk_keys)
                  for s in seqs]
        chunks = max(c1 - c0 for c0, c1 in ranges)
        ids = torch.full((units, chunks * per_chunk), -1, dtype=torch.long)
        for i, (s, (c0, _)) in enumerate(zip(seqs, ranges)):
            table_first = s.key_start // block_size  # absolute block of block_table[0]
            lo = c0 * per_chunk - table_first
            part = s.block_table[max(0, lo) : lo + chunks * per_chunk]
            ids[i, max(0, -lo) : max(0, -lo) + len(part)] = part.cpu()
        ids = ids.to(device)
        starts = torch.tensor([c0 * chunk_keys for c0, _ in ranges], device=device)
        k_pos = starts[:, None] + torch.arange(chunks * chunk_keys, device=device)  # [U, keys]
        pos = torch.tensor([[s.ctx_len - q_len + t for t in range(t0, t1)] for s in seqs], device=device)
        visible = (ids >= 0).repeat_interleave(block_size, dim=1)[:, None, :] & (k_pos[:, None, :] <= pos[:, :, None])
        if window is not None:
            visible &= k_pos[:, None, :] > pos[:, :, None] - window
        # [U, tokens, C * keys] -> [1, U, C, rows, keys]: one mask row per query row.
        visible = visible.repeat_interleave(group, dim=1).unflatten(2, (chunks, chunk_keys)).transpose(1, 2)
        blocks.append(_Block(slice(t0 * group, t1 * group), chunks,
                             ids.clamp(min=0).reshape(-1) * (2 * num_layers), ~visible[None]))
    q_rows = torch.tensor([s.q_start + i for s in seqs for i in range(q_len)], device=device)
    return _Unit(q_rows, units, q_len, blocks)


def _attend(q, kv_pool, layer_idx, unit: _Unit, scale, matmul, out, chunk_keys) -> None:
    _, heads, head_dim = q.shape
    num_layers, kv_heads = kv_pool.shape[1], kv_pool.shape[-2]
    group = heads // kv_heads
    units, q_len = unit.units, unit.q_len
    # Queries as [U, kv_heads, rows, d]: row r of a KV head is token r // group, head r % group.
    qs = q.index_select(0, unit.q_rows).float().view(units, q_len, kv_heads, group, head_dim)
    qs = qs.transpose(1, 2).reshape(units, kv_heads, q_len * group, head_dim)
    kv_rows = kv_pool.view(kv_pool.shape[0] * num_layers * 2, -1)
    result = torch.empty_like(qs)
    for block in unit.blocks:
        chunks, entries = block.chunks, units * block.chunks
        base = block.block_rows + 2 * layer_idx
        k = kv_rows.index_select(0, base).float().view(entries, chunk_keys, kv_heads, head_dim)
        v = kv_rows.index_select(0, base + 1).float().view(entries, chunk_keys, kv_heads, head_dim)
        q_b = qs[:, :, block.rows]
        rows = q_b.shape[2]
        # One batch entry per (sequence, chunk) and one call per KV head: a head's K and V are
        # strided views that BLAS reads in place.
        scores = torch.stack([
            matmul.matmul(q_b[:, h, None].expand(units, chunks, rows, head_dim).reshape(entries, rows, head_dim),
                          k[:, :, h].transpose(1, 2)).view(units, chunks, rows, chunk_keys)
            for h in range(kv_heads)])  # [kvh, U, C, rows, keys]: a head's slice stays contiguous
        scores.mul_(scale).masked_fill_(block.hidden, float("-inf"))
        probs = scores.sub_(scores.amax(dim=(2, 4), keepdim=True)).exp_()
        total = probs.sum(dim=-1).cumsum(dim=2)[:, :, -1]  # [kvh, U, rows]
        weighted = torch.stack([
            matmul.matmul(probs[h].view(entries, rows, chunk_keys), v[:, :, h]).view(units, chunks, rows, head_dim)
            for h in range(kv_heads)])  # [kvh, U, C, rows, d]
        result[:, :, block.rows] = (weighted.cumsum(dim=2)[:, :, -1] / total[..., None]).transpose(0, 1)
    result = result.view(units, kv_heads, q_len, group, head_dim).transpose(1, 2)
    out.index_copy_(0, unit.q_rows, result.reshape(units * q_len, heads, head_dim).to(out.dtype))
