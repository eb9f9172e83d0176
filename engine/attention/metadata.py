"""Per-step attention metadata: where each new token's KV goes and what each sequence reads.

The model runner builds one `StepMetadata` per step: one entry per KV group
(engine/kv_cache/specs.py), an `AttentionMetadata` for attention groups and an `SsmMetadata`
(attention/ssm_metadata.py) for state-space groups. Every layer reads its own group's entry;
the object is passed down through `forward`, never stored in a global.

A sliding-window group only reads the blocks inside the window: its block tables start at
the first block the step's earliest query still sees (`key_start`), since blocks before it
may already be freed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqAttention:
    """One sequence's slice of the flat token batch."""

    q_start: int  # first row of this sequence in the flat batch
    q_len: int  # new tokens computed this step
    ctx_len: int  # tokens with KV after this step (cached prefix + new tokens)
    block_table: torch.Tensor  # block ids covering keys [key_start, ctx_len), on the device
    key_start: int = 0  # position of the first key in block_table (block-aligned)
    invariant: bool = False  # deterministic request: attention/invariant_attention.py serves it


@dataclass
class DecodeBatch:
    """Sequences with exactly one new token, padded into one batched attention call."""

    rows: torch.Tensor  # [B] rows of the flat batch
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    valid: torch.Tensor  # [B, 1, 1, max_blocks * block_size] bool: key j is visible to the query


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block that receives each new token's KV
    slot_offsets: torch.Tensor  # [T] offset inside that block
    seqs: list[SeqAttention]
    decodes: list[DecodeBatch]  # single-token sequences, bucketed by context length
    prefill_seqs: list[SeqAttention]  # seqs not covered by `decodes`
    block_size: int
    window: int | None = None  # sliding window of this group's layers, None = full attention
    invariant_seqs: list[SeqAttention] = field(default_factory=list)  # not in decodes / prefill_seqs
    invariant_plan: list | None = None  # built by the first layer (attention/invariant_attention.py)


@dataclass
class StepMetadata:
    """What the model's forward receives: one metadata object per KV group."""

    groups: list  # AttentionMetadata | SsmMetadata, indexed by group


def build_attention_metadata(
    seq_specs: list[tuple[int, int, list[int]]],
    block_size: int,
    device: torch.device,
    batch_decodes: bool = True,
    window: int | None = None,
    invariant: list[bool] | None = None,
) -> AttentionMetadata:
    """seq_specs: per sequence (num_computed_before, num_new_tokens, block_ids), in batch order.
    block_ids is the sequence's whole table (for a sliding group, entries before the window
    may be stale or -1: they are never read). `invariant[i]` routes sequence i to the
    batch-invariant path of deterministic mode."""
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    seqs: list[SeqAttention] = []
    q_start = 0
    for num_computed, num_new, block_ids in seq_specs:
        ctx_len = num_computed + num_new
        first, visible = visible_blocks(num_computed, num_new, block_ids, block_size, window)
        for pos in range(num_computed, ctx_len):
            slot_blocks.append(block_ids[pos // block_size])
            slot_offsets.append(pos % block_size)
        table = torch.tensor(visible, dtype=torch.long, device=device)
        flag = bool(invariant[len(seqs)]) if invariant is not None else False
        seqs.append(SeqAttention(q_start, num_new, ctx_len, table, first * block_size, flag))
        q_start += num_new

    decodes = []
    fast = [s for s in seqs if not s.invariant]
    prefill_seqs = fast
    if batch_decodes:
        decode_seqs = [s for s in fast if s.q_len == 1]
        if len(decode_seqs) > 1:
            prefill_seqs = [s for s in fast if s.q_len != 1]
            decodes = [_build_decode_batch(b, block_size, device, window) for b in bucket_by_length(decode_seqs)]
    return AttentionMetadata(
        slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
        slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
        seqs=seqs,
        decodes=decodes,
        prefill_seqs=prefill_seqs,
        block_size=block_size,
        window=window,
        invariant_seqs=[s for s in seqs if s.invariant],
    )


def visible_blocks(num_computed: int, num_new: int, block_ids: list[int], block_size: int,
                   window: int | None) -> tuple[int, list[int]]:
    """(index of the first block the step's earliest query sees, the blocks from there to the
    context's end). RuntimeError for a table too short, or a freed block inside the window."""
    needed = -(-(num_computed + num_new) // block_size)
    if needed > len(block_ids):
        raise RuntimeError(f"block table holds {len(block_ids)} blocks but {needed} are needed")
    first = 0 if window is None else max(0, num_computed - window + 1) // block_size
    visible = block_ids[first:needed]
    if window is not None and min(visible, default=0) < 0:
        raise RuntimeError(f"sliding block table has a freed block inside the window: {visible}")
    return first, visible


def bucket_by_length(seqs: list[SeqAttention]) -> list[list[SeqAttention]]:
    """Group decodes of similar length: a batch pads every context to its longest, so one
    batch over 30- and 1000-token contexts would gather and attend mostly padding. A new
    bucket costs one more kernel launch per layer, so it opens only when the padding saved
    exceeds max(8 blocks, a quarter of the bucket's longest context)."""
    ordered = sorted(seqs, key=lambda s: len(s.block_table), reverse=True)
    buckets: list[list[SeqAttention]] = []
    longest = 0
    for s in ordered:
        n = len(s.block_table)
        if buckets and longest - n <= max(8, longest // 4):
            buckets[-1].append(s)
        else:
            buckets.append([s])
            longest = n
    return buckets


def _build_decode_batch(
    seqs: list[SeqAttention], block_size: int, device: torch.device, window: int | None
) -> DecodeBatch:
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = s.block_table
    # Key j of row i sits at absolute position key_start_i + j; the query is at ctx - 1.
    end = torch.tensor([s.ctx_len - s.key_start for s in seqs], device=device)
    key_pos = torch.arange(max_blocks * block_size, device=device)
    valid = key_pos[None, :] < end[:, None]
    if window is not None:
        valid &= key_pos[None, :] >= (end - window)[:, None]
    rows = torch.tensor([s.q_start for s in seqs], dtype=torch.long, device=device)
    return DecodeBatch(rows=rows, block_tables=tables, valid=valid[:, None, None, :])
