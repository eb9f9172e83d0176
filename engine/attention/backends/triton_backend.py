"""`triton` backend: the kernels of `kvtier.engine.kernels`, one launch per layer per step.

Its metadata is flat and device-side: one padded int32 block table for the step, the query
offsets, context lengths and table starts (`PagedAttentionInputs`), and the flat slot of
every new token. All of it is packed into one host list and moved to the device as one
tensor, so building a step costs one transfer, not one small tensor per sequence.

Deterministic sequences keep their per-sequence tables (`invariant_seqs`) for the invariant
path, which overwrites their rows after the kernel has run. The kernel computes them too
(the launch covers consecutive query rows); when every sequence is deterministic it is skipped.

Importing this module imports triton: check `kvtier.engine.kernels.triton_available` first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtier.engine.attention.backends.base import AttentionBackend
from kvtier.engine.attention.metadata import SeqAttention, visible_blocks
from kvtier.engine.kernels.attention_inputs import PagedAttentionInputs
from kvtier.engine.kernels.kv_write_triton import write_kv_slots
from kvtier.engine.kernels.paged_attention_triton import paged_attention


@dataclass
class TritonAttentionMetadata:
    inputs: PagedAttentionInputs | None  # None when every sequence is deterministic
    slots: torch.Tensor  # [T] int32, block * block_size + offset of each new token
    block_size: int
    window: int | None = None
    invariant_seqs: list[SeqAttention] = field(default_factory=list)
    invariant_plan: list | None = None  # built by the first layer (attention/invariant_attention.py)


def build_triton_metadata(seq_specs: list[tuple[int, int, list[int]]], block_size: int, device: torch.device,
                          window: int | None = None, invariant: list[bool] | None = None) -> TritonAttentionMetadata:
    """The same sequences, positions and visible blocks as `build_attention_metadata`, packed flat."""
    rows: list[list[int]] = []
    cu, seq_lens, key_starts, slots = [0], [], [], []
    invariant_seqs: list[SeqAttention] = []
    max_q = max_ctx = 0
    for i, (num_computed, num_new, block_ids) in enumerate(seq_specs):
        ctx_len = num_computed + num_new
        first, visible = visible_blocks(num_computed, num_new, block_ids, block_size, window)
        slots.extend(block_ids[p // block_size] * block_size + p % block_size for p in range(num_computed, ctx_len))
        if invariant is not None and invariant[i]:
            table = torch.tensor(visible, dtype=torch.long, device=device)
            invariant_seqs.append(SeqAttention(cu[-1], num_new, ctx_len, table, first * block_size, True))
        rows.append(visible)
        cu.append(cu[-1] + num_new)
        seq_lens.append(ctx_len)
        key_starts.append(first * block_size)
        max_q, max_ctx = max(max_q, num_new), max(max_ctx, ctx_len)
    n = len(rows)
    width = max(1, max((len(r) for r in rows), default=0))
    flat = [b for r in rows for b in (*r, *([0] * (width - len(r))))]  # padding: block 0, never read
    flat += cu + seq_lens + key_starts + slots
    packed = torch.tensor(flat, dtype=torch.int32)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    tables, cu_t, lens_t, starts_t, slots_t = packed.split([n * width, n + 1, n, n, len(slots)])
    inputs = None
    if len(invariant_seqs) < n:
        inputs = PagedAttentionInputs(tables.view(n, width), cu_t, lens_t, starts_t, max_q, max_ctx, window)
    return TritonAttentionMetadata(inputs, slots_t, block_size, window, invariant_seqs)


class TritonBackend(AttentionBackend):
    name = "triton"

    def build_metadata(self, seq_specs, block_size, device, window=None, invariant=None):
        return build_triton_metadata(seq_specs, block_size, device, window, invariant)

    def write_kv(self, kv_layer, k, v, meta: TritonAttentionMetadata) -> None:
        write_kv_slots(kv_layer, k, v, meta.slots)

    def attend(self, layer, q, k, v, meta: TritonAttentionMetadata, out: torch.Tensor) -> None:
        if meta.inputs is not None:
            paged_attention(q, layer.kv_layer, meta.inputs, layer.scale, out)
