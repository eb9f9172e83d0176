"""Managers of attention groups: full attention, and sliding window (frees what left the window)."""
from __future__ import annotations

from kvtier.engine.kv_cache.block_pool import KVBlock
from kvtier.engine.kv_cache.group_manager import GroupHits, GroupManager, StepPlan
from kvtier.engine.request import Request


class _PrefixHits(GroupHits):
    def __init__(self, blocks: list[KVBlock]):
        self._blocks = blocks
        self.upper = len(blocks)

    def can_resume(self, n: int) -> bool:
        return n <= self.upper

    def blocks(self, n: int) -> list[KVBlock | None]:
        return self._blocks[:n]


class _WindowHits(GroupHits):
    """Cached flags for every block; a resume at n blocks needs the ones inside its window."""

    def __init__(self, cached: list[KVBlock | None], first_visible):
        self._cached = cached
        self._first = first_visible  # n -> first block a query at n * block_size reads
        self.upper = len(cached)
        # run[i]: consecutive cached blocks ending at block i
        self._run = []
        run = 0
        for b in cached:
            run = run + 1 if b is not None else 0
            self._run.append(run)

    def can_resume(self, n: int) -> bool:
        if n == 0:
            return True
        return n <= self.upper and self._run[n - 1] >= n - self._first(n)

    def blocks(self, n: int) -> list[KVBlock | None]:
        first = self._first(n)
        return [None] * first + self._cached[first:n]


class FullAttentionManager(GroupManager):
    def find_hits(self, request: Request, max_blocks: int) -> GroupHits:
        bs = self.block_size
        hits: list[KVBlock] = []
        for i, h in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.get_cached_block(h, request.token_ids_slice(i * bs, (i + 1) * bs))
            if block is None:
                break
            hits.append(block)
        return _PrefixHits(hits)

    def needs(self, request: Request, hits: list[KVBlock | None], plan: StepPlan) -> tuple[int, int]:
        """(new blocks up to plan.total, idle cached hits this takes out of the free queue)."""
        held = len(self.req_blocks.get(request.request_id, ())) + len(hits)
        idle = sum(1 for b in hits if b is not None and b.ref_cnt == 0)
        return max(0, -(-plan.total // self.block_size) - held), idle

    def apply(self, request: Request, hits: list[KVBlock | None], plan: StepPlan, new: int) -> None:
        """Take the hits and `new` blocks; publish the blocks this step fills (a load's are
        published once it succeeds: publish_loaded)."""
        self.pool.touch([b for b in hits if b is not None])
        blocks = self.req_blocks.setdefault(request.request_id, [])
        blocks.extend(hits)
        blocks.extend(self.pool.allocate(new))
        if not plan.loading:
            self._publish(request, blocks, plan.total, computed=True)

    def publish_loaded(self, request: Request, num_tokens: int) -> None:
        self._publish(request, self.req_blocks[request.request_id], num_tokens, computed=False)

    def load_block_ids(self, request: Request, device_tokens: int, resume_tokens: int) -> list[int]:
        table = self.req_blocks[request.request_id]
        return [table[i].block_id for i in self.info.blocks_to_load(device_tokens, resume_tokens, self.block_size)]


class SlidingWindowManager(FullAttentionManager):
    def find_hits(self, request: Request, max_blocks: int) -> GroupHits:
        bs = self.block_size
        cached = [
            self.pool.get_cached_block(h, request.token_ids_slice(i * bs, (i + 1) * bs))
            for i, h in enumerate(request.block_hashes[:max_blocks])
        ]
        return _WindowHits(cached, lambda n: self.info.first_visible_block(n * bs, bs))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Per request: its table holds None before this index (released, or never held), so
        # each step looks only at the blocks that left the window since the last one.
        self._released: dict[str, int] = {}

    def release_unneeded(self, request: Request) -> None:
        """Free the blocks no later query of the request can see (they stay cached)."""
        rid = request.request_id
        table = self.req_blocks.get(rid)
        if not table:
            return
        first = min(self.info.first_visible_block(request.num_computed_tokens, self.block_size), len(table))
        done = self._released.get(rid, 0)
        if first <= done:
            return
        gone = [b for b in table[done:first] if b is not None]
        table[done:first] = [None] * (first - done)
        self._released[rid] = first
        if gone:
            self.pool.free(reversed(gone))

    def free(self, request: Request, first_out: bool = False) -> None:
        self._released.pop(request.request_id, None)
        super().free(request, first_out)

    def transfer(self, old: Request, new: Request) -> None:
        super().transfer(old, new)
        if old.request_id in self._released:
            self._released[new.request_id] = self._released.pop(old.request_id)

    def admission_headroom(self) -> int:
        """A prefill's next chunk takes new blocks before the previous chunk's leave the
        window: admitting a request only when a window's worth is free beyond its first
        chunk keeps running requests from being preempted (and recomputed) for it."""
        return -(-self.info.window // self.block_size) + 1
