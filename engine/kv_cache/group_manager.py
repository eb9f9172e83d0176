"""What every KV group's manager shares: a block pool, per-request tables, publication.

A manager answers for one group (engine/kv_cache/specs.py): which blocks a request holds,
which of its prefixes the group can resume from (`find_hits`), how many new blocks a step
needs (`plan`), and it publishes full blocks under their prefix hash so later requests, and
connectors saving to tiers, find them. Only the coordinator calls managers.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvtier.connectors.groups import GroupInfo
from kvtier.engine.kv_cache.block_pool import BlockPool, KVBlock
from kvtier.engine.kv_cache.specs import KVGroup
from kvtier.engine.request import Request


@dataclass(frozen=True)
class StepPlan:
    """One allocation, as every group manager sees it (positions are token counts)."""

    device_tokens: int  # the request's device resume point (computed + cached hit)
    start: int  # first token computed this step (after what a connector loads)
    num_new: int  # tokens computed this step
    loading: bool  # a connector loads [device_tokens, start) first

    @property
    def total(self) -> int:
        return self.start + self.num_new


class GroupHits:
    """A group's answer to "from which block-aligned lengths can this request resume?"."""

    upper: int = 0  # no resume point beyond this many blocks

    def can_resume(self, n: int) -> bool:
        raise NotImplementedError

    def blocks(self, n: int) -> list[KVBlock | None]:
        """The cached blocks a resume at n blocks takes (None where none is needed)."""
        raise NotImplementedError


class GroupManager:
    def __init__(self, group: KVGroup, info: GroupInfo, num_blocks: int, block_size: int,
                 enable_caching: bool, track_transfers: bool):
        self.group = group
        self.info = info
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.track_transfers = track_transfers
        self.pool = BlockPool(num_blocks, enable_caching, record_evictions=track_transfers)
        # Per request: its table, indexed by block position (None: not held).
        self.req_blocks: dict[str, list[KVBlock | None]] = {}
        self.num_published: dict[str, int] = {}
        # (block id, hash) computed this step, for a write-through connector to save.
        self.newly_full: list[tuple[int, bytes]] = []

    @property
    def index(self) -> int:
        return self.group.index

    def release_unneeded(self, request: Request) -> None:
        """Before an allocation: give back what no later step of the request reads."""

    def admission_headroom(self) -> int:
        """Free blocks, beyond its first step's, a new request must leave to admit it."""
        return 0

    def step_view(self, request: Request, num_computed: int):
        """What this step's forward needs of the group: here, the request's block table."""
        return self.block_ids(request.request_id)

    def end_step(self) -> None:
        """The step's forward has run."""

    def take_newly_full(self) -> list[tuple[int, bytes]]:
        out, self.newly_full = self.newly_full, []
        return out

    def block_ids(self, request_id: str) -> list[int]:
        return [-1 if b is None else b.block_id for b in self.req_blocks.get(request_id, ())]

    def free(self, request: Request, first_out: bool = False) -> None:
        # Reverse order: a prefix's tail is evicted before its head, which more requests
        # share (first_out pushes to the head, so the head goes in last there).
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_published.pop(request.request_id, None)
        held = [b for b in blocks if b is not None]
        self.pool.free(held if first_out else reversed(held), first_out)

    def transfer(self, old: Request, new: Request) -> None:
        """A resumed request takes over a parked one's blocks."""
        if old.request_id in self.req_blocks:
            self.req_blocks[new.request_id] = self.req_blocks.pop(old.request_id)
        if old.request_id in self.num_published:
            self.num_published[new.request_id] = self.num_published.pop(old.request_id)

    def held_blocks(self, request_id: str) -> int:
        return sum(1 for b in self.req_blocks.get(request_id, ()) if b is not None)

    def _publish(self, request: Request, blocks: list[KVBlock | None], num_tokens: int, computed: bool) -> None:
        """Publish the request's blocks that are full once num_tokens have KV."""
        if not self.enable_caching:
            return
        bs = self.block_size
        start = self.num_published.get(request.request_id, 0)
        end = min(num_tokens // bs, len(request.block_hashes), len(blocks))
        for i in range(start, end):
            block = blocks[i]
            if block is None:
                continue
            tokens = request.token_ids_slice(i * bs, (i + 1) * bs)
            if self.pool.cache_block(block, request.block_hashes[i], tokens) and computed and self.track_transfers:
                self.newly_full.append((block.block_id, request.block_hashes[i]))
        self.num_published[request.request_id] = max(start, end)
