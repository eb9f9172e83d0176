"""The flat, device-side inputs the triton paged-attention kernel reads, and their conversion
from (and back to) the engine's per-sequence `AttentionMetadata`.

The kernel wants one padded int32 block table for the whole step instead of one small tensor
per sequence, so a backend can build these once per step on the device. `from_metadata`
converts today's metadata (for tests and for wiring before a dedicated builder exists);
`to_metadata` goes the other way so the torch reference can check the kernel on the very
same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.engine.attention.metadata import AttentionMetadata, SeqAttention


@dataclass
class PagedAttentionInputs:
    block_tables: torch.Tensor  # [S, max_blocks] int32; row i covers keys [key_start_i, seq_lens_i)
    cu_seqlens_q: torch.Tensor  # [S + 1] int32; sequence i owns query rows [cu[i], cu[i+1])
    seq_lens: torch.Tensor  # [S] int32; tokens with KV after this step (queries are the last ones)
    key_start: torch.Tensor  # [S] int32; position of block_tables[i, 0]'s first key (block-aligned)
    max_q_len: int  # host-side bounds, so launching needs no device sync
    max_seq_len: int
    window: int | None = None  # sliding window (keys in (p - window, p]), None = full attention


def from_metadata(meta: AttentionMetadata) -> PagedAttentionInputs:
    """Pack the per-sequence tables of `meta` into one padded table (padding: block 0, never read)."""
    seqs = meta.seqs
    device = seqs[0].block_table.device if seqs else meta.slot_blocks.device
    width = max((len(s.block_table) for s in seqs), default=0)
    tables = torch.zeros(len(seqs), max(width, 1), dtype=torch.int32, device=device)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = s.block_table
    cu = [0]
    for s in seqs:
        if s.q_start != cu[-1]:
            raise ValueError("sequences must own consecutive query rows, in batch order")
        cu.append(cu[-1] + s.q_len)
    return PagedAttentionInputs(
        block_tables=tables,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s.ctx_len for s in seqs], dtype=torch.int32, device=device),
        key_start=torch.tensor([s.key_start for s in seqs], dtype=torch.int32, device=device),
        max_q_len=max((s.q_len for s in seqs), default=0),
        max_seq_len=max((s.ctx_len for s in seqs), default=0),
        window=meta.window,
    )


def to_metadata(inputs: PagedAttentionInputs, block_size: int) -> AttentionMetadata:
    """The per-sequence metadata the torch reference reads (no slots: K/V are already written)."""
    cu = inputs.cu_seqlens_q.tolist()
    ctx = inputs.seq_lens.tolist()
    starts = inputs.key_start.tolist()
    seqs = []
    for i in range(len(ctx)):
        n_blocks = -(-(ctx[i] - starts[i]) // block_size)
        table = inputs.block_tables[i, :n_blocks].long()
        seqs.append(SeqAttention(cu[i], cu[i + 1] - cu[i], ctx[i], table, starts[i]))
    empty = torch.empty(0, dtype=torch.long, device=inputs.block_tables.device)
    return AttentionMetadata(slot_blocks=empty, slot_offsets=empty, seqs=seqs, decodes=[],
                             prefill_seqs=seqs, block_size=block_size, window=inputs.window)


def slot_mapping(meta: AttentionMetadata) -> torch.Tensor:
    """Flat slot (block * block_size + offset) of each new token, what the KV-write kernel reads."""
    return meta.slot_blocks * meta.block_size + meta.slot_offsets
