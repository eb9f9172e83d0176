"""What a connector knows about the engine's KV groups, and which blocks a resume point needs.

Every group stores "blocks" keyed by the chained prefix hash (kvstore/keys.py carries the
group index): attention groups one block of KV per `block_size` tokens, SSM groups one
state checkpoint per checkpointed position (keyed by the hash of the prefix it ends). To
resume a request at token L, given that the device already holds a valid resume point at
L0 < L, each group needs:
- full attention: blocks [L0/bs, L/bs);
- sliding window: those of them still inside the window of a query at L;
- SSM state: the checkpoint at L (hash index L/bs - 1).
The engine (allocation) and connectors (lookup, load) share this rule through
`GroupInfo.blocks_to_load`, so their block lists line up.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvtier.kvstore.tiers.spec import BlockLayout

KINDS = ("full", "sliding", "ssm")


@dataclass(frozen=True)
class GroupInfo:
    kind: str  # "full" | "sliding" | "ssm"
    layout: BlockLayout  # one stored block of this group
    window: int | None = None  # sliding groups only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KV group kind: unknown {self.kind!r}; one of {', '.join(KINDS)}")
        if (self.kind == "sliding") != (self.window is not None):
            raise ValueError("KV group: a window is given for sliding groups and only for them")

    def first_visible_block(self, position: int, block_size: int) -> int:
        """First block a query at `position` reads (0 unless the group slides)."""
        if self.window is None:
            return 0
        return max(0, position - self.window + 1) // block_size

    def blocks_to_load(self, device_tokens: int, resume_tokens: int, block_size: int) -> list[int]:
        """Hash indices (block i is keyed by block_hashes[i]) this group needs from outside
        to resume at `resume_tokens` when the device holds a resume point at `device_tokens`.
        Both are multiples of block_size."""
        first, end = device_tokens // block_size, resume_tokens // block_size
        if end <= first:
            return []
        if self.kind == "ssm":
            return [end - 1]
        return list(range(max(first, self.first_visible_block(resume_tokens, block_size)), end))
