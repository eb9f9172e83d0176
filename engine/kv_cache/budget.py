"""How the device KV memory budget is split between KV groups.

Each group gets a share proportional to what it needs to serve `max_num_seqs` sequences of
`max_model_len` tokens while one step prefills `max_num_batched_tokens`:
- full attention: every block of a max_model_len sequence, per sequence;
- sliding window: the window's blocks plus one, per sequence, plus the blocks of one step's
  prefill chunk (new K/V is written before attention, then blocks that left the window are freed);
- SSM state: two state slots per sequence (its live state and one checkpoint).
`kv_group_memory_fractions` overrides the shares (one fraction per group, summing to at most 1).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.engine.kv_cache.specs import KVGroup


def block_bytes(group: KVGroup, block_size: int, dtype: torch.dtype) -> int:
    return torch.Size(group.block_shape(block_size)).numel() * dtype.itemsize


def group_need_bytes(group: KVGroup, block_size: int, dtype: torch.dtype, max_num_seqs: int,
                     max_model_len: int, max_num_batched_tokens: int) -> int:
    per_seq_blocks = -(-max_model_len // block_size)
    size = block_bytes(group, block_size, dtype)
    if group.kind == "full":
        return max_num_seqs * per_seq_blocks * size
    if group.kind == "sliding":
        window_blocks = min(per_seq_blocks, -(-group.spec.window // block_size) + 1)
        return (max_num_seqs * window_blocks + -(-max_num_batched_tokens // block_size)) * size
    return 2 * max_num_seqs * size


def split_kv_budget(groups: Sequence[KVGroup], total_bytes: int, block_size: int, dtype: torch.dtype,
                    max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int,
                    fractions: Sequence[float] | None = None) -> list[int]:
    """Blocks (state slots for SSM groups) per group; ValueError when a group gets none."""
    if fractions is None:
        needs = [group_need_bytes(g, block_size, dtype, max_num_seqs, max_model_len, max_num_batched_tokens)
                 for g in groups]
        fractions = [n / sum(needs) for n in needs]
    elif len(fractions) != len(groups):
        raise ValueError(f"kv_group_memory_fractions: the model has {len(groups)} KV groups "
                         f"({', '.join(g.kind for g in groups)}), got {len(fractions)} fractions")
    counts = []
    for g, share in zip(groups, fractions):
        size = block_bytes(g, block_size, dtype)
        n = int(total_bytes * share) // size
        minimum = 2 if g.kind == "ssm" else 1
        if n < minimum:
            raise ValueError(
                f"kv_cache_memory_bytes: {total_bytes} bytes give KV group {g.index} ({g.kind}, "
                f"{size} bytes per {'state slot' if g.kind == 'ssm' else 'block'}) only {n}; "
                f"it needs at least {minimum}"
            )
        counts.append(n)
    return counts


def default_checkpoint_interval(groups: Sequence[KVGroup], block_size: int, dtype: torch.dtype) -> int:
    """Tokens between SSM checkpoints: the smallest multiple of block_size whose attention KV
    (all attention groups) weighs at least one checkpoint, so checkpoints cost no more memory
    than the KV of the tokens they cover. A model without attention layers uses 64 blocks."""
    attn_per_block = sum(block_bytes(g, block_size, dtype) for g in groups if g.kind != "ssm")
    ssm = sum(block_bytes(g, block_size, dtype) for g in groups if g.kind == "ssm")
    if not attn_per_block:
        return 64 * block_size
    return max(1, -(-ssm // attn_per_block)) * block_size
