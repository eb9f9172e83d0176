"""The one object the scheduler asks about KV memory, answering for every KV group.

A request's resume point is the longest block-aligned length L such that every group can
resume there: full-attention groups hold blocks [0, L), sliding groups hold the blocks
inside the window of a query at L, SSM groups hold a checkpoint at L. Admission,
allocation, publication and freeing go to each group's manager; a step fits only if every
group has room. Only the scheduler calls this (docs/architecture.md §2).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.connectors.base import LoadResult
from kvtier.connectors.groups import GroupInfo
from kvtier.engine.kv_cache.attention_manager import FullAttentionManager, SlidingWindowManager
from kvtier.engine.kv_cache.block_hash import extend_block_hashes
from kvtier.engine.kv_cache.block_pool import STORED, REMOVED, KVBlock
from kvtier.engine.kv_cache.group_manager import StepPlan
from kvtier.engine.kv_cache.ssm_manager import SsmStateManager
from kvtier.engine.kv_cache.specs import KVGroup
from kvtier.engine.request import Request
from kvtier.kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass
class PrefixHit:
    blocks: list[list[KVBlock | None]]  # per group, what a resume at num_tokens takes
    num_tokens: int


class KVCacheCoordinator:
    def __init__(self, groups: Sequence[KVGroup], infos: Sequence[GroupInfo], num_blocks: Sequence[int],
                 block_size: int, enable_caching: bool, max_num_batched_tokens: int,
                 ssm_checkpoint_interval: int, track_transfers: bool = False, ssm_branch_points: bool = True):
        """track_transfers: record newly full and evicted blocks for a connector, which
        drains them every step (Scheduler._notify_connector); off without one."""
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_num_batched_tokens = max_num_batched_tokens
        self.groups = list(groups)
        self.infos = list(infos)
        self.managers = []
        for g, info, n in zip(groups, infos, num_blocks):
            args = (g, info, n, block_size, enable_caching, track_transfers)
            if g.kind == "ssm":
                self.managers.append(SsmStateManager(*args, interval=ssm_checkpoint_interval,
                                                     branch_points=ssm_branch_points))
            elif g.kind == "sliding":
                self.managers.append(SlidingWindowManager(*args))
            else:
                self.managers.append(FullAttentionManager(*args))
        # A partial load is usable up to its first bad block only when every group is plain
        # full attention; otherwise the blocks loaded do not form a shorter resume point.
        self.partial_loads = all(g.kind == "full" for g in groups) and len(groups) == 1
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found on the device
        self.event_medium: str | None = None  # KV events on (enable_events) under this medium name

    # ---- admission ------------------------------------------------------------------
    def admission_error(self, num_tokens: int) -> str | None:
        """Why a prompt of num_tokens can never run, or None."""
        bs = self.block_size
        for m in self.managers:
            if m.group.kind == "ssm":
                continue
            need = -(-num_tokens // bs)
            if m.group.kind == "sliding":
                need = min(need, -(-(m.group.spec.window + self.max_num_batched_tokens) // bs) + 1)
            if need > m.pool.num_blocks:
                return (f"prompt has {num_tokens} tokens but the KV pool of group {m.index} ({m.group.kind}) "
                        f"holds only {m.pool.num_blocks} blocks of {bs} tokens and it needs {need}; "
                        f"raise kv_cache_memory_bytes")
        return None

    @property
    def max_seq_tokens(self) -> int | None:
        """Longest sequence the pool can hold alone (None: no full-attention group bounds it)."""
        full = [m.pool.num_blocks for m in self.managers if m.group.kind == "full"]
        return min(full) * self.block_size if full else None

    def update_block_hashes(self, request: Request) -> None:
        """Hash every full block of the request that is not hashed yet."""
        if not self.enable_caching or request.num_tokens // self.block_size == len(request.block_hashes):
            return
        tokens = request.prompt_token_ids + request.output_token_ids
        extend_block_hashes(request.block_hashes, request.hash_root, tokens, len(tokens), self.block_size)

    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """The longest resume point every group holds (no side effects). At least one token
        is always left to compute, so the step produces logits."""
        if not self.enable_caching:
            return PrefixHit([[] for _ in self.managers], 0)
        max_blocks = (request.num_tokens - 1) // self.block_size
        found = [m.find_hits(request, max_blocks) for m in self.managers]
        n = min(f.upper for f in found)
        while n > 0 and not all(f.can_resume(n) for f in found):
            n -= 1
        return PrefixHit([f.blocks(n) for f in found], n * self.block_size)

    # ---- allocation -----------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None,
                       num_external_tokens: int = 0) -> bool:
        """Reserve room for `num_new_tokens` to compute (plus `num_external_tokens` a connector
        will load) in every group; False when some group cannot fit them. Blocks to be
        loaded are published only once the load succeeds (publish_loaded)."""
        hits = hit.blocks if hit is not None else [[] for _ in self.managers]
        device_tokens = request.num_computed_tokens + (hit.num_tokens if hit is not None else 0)
        start = device_tokens + num_external_tokens
        plan = StepPlan(device_tokens, start, num_new_tokens, num_external_tokens > 0)
        for m in self.managers:
            m.release_unneeded(request)
        admitting = hit is not None
        new_blocks = []
        for m, h in zip(self.managers, hits):
            new, idle = m.needs(request, h, plan)
            # Headroom protects running requests; none to protect (an idle pool), or a pool
            # too small to ever leave it: admit without.
            headroom = m.admission_headroom() if admitting and m.pool.num_free_blocks < m.pool.num_blocks else 0
            if new + headroom > m.pool.num_blocks - idle:
                headroom = 0
            if new + headroom > m.pool.num_free_blocks - idle:
                return False
            new_blocks.append(new)
        marks = self._event_marks()
        for m, h, new in zip(self.managers, hits, new_blocks):
            m.apply(request, h, plan, new)
        if marks is not None:
            self._annotate_events(request, marks, None)
        return True

    def step_view(self, request: Request, num_computed: int) -> tuple:
        """Per group, what this step's forward needs: the block table of an attention group,
        (init slot, live slot, checkpoints) of an SSM group."""
        return tuple(m.step_view(request, num_computed) for m in self.managers)

    def load_block_ids(self, request: Request, device_tokens: int, resume_tokens: int) -> tuple[list[int], ...]:
        """Per group, the device blocks a connector fills, in GroupInfo.blocks_to_load order."""
        return tuple(m.load_block_ids(request, device_tokens, resume_tokens) for m in self.managers)

    def block_ids(self, request_id: str) -> tuple[list[int], ...]:
        """Per group, the blocks (state slots) a request holds; -1 where a sliding block was freed."""
        return tuple(m.block_ids(request_id) for m in self.managers)

    def loaded_tokens(self, device_tokens: int, resume_tokens: int, result: LoadResult) -> int:
        """Where a request resumes after its load: the whole load, its intact head (dense
        models), or back at the device resume point."""
        if result.num_blocks_ok >= result.num_blocks:
            return resume_tokens
        if self.partial_loads:
            return device_tokens + result.num_blocks_ok * self.block_size
        return device_tokens

    def publish_loaded(self, request: Request, num_tokens: int) -> None:
        """A connector filled the request's blocks up to num_tokens: make them shareable."""
        marks = self._event_marks()
        for m in self.managers:
            m.publish_loaded(request, num_tokens)
        if marks is not None:
            self._annotate_events(request, marks, "loaded")

    def end_step(self) -> None:
        for m in self.managers:
            m.end_step()

    def free(self, request: Request, first_out: bool = False) -> None:
        """Release every block the request holds (first_out: reuse them before other free blocks)."""
        for m in self.managers:
            m.free(request, first_out)

    def transfer(self, old: Request, new: Request) -> None:
        """`new` (a resumed turn) takes over the blocks `old` (parked) holds."""
        for m in self.managers:
            m.transfer(old, new)

    def held_share(self, request_id: str) -> float:
        """The share of the device KV memory a request holds (all groups, by bytes)."""
        held = total = 0
        for m in self.managers:
            size = m.info.layout.nbytes
            held += m.held_blocks(request_id) * size
            total += m.pool.num_blocks * size
        return held / total

    def used_share(self) -> float:
        """The share of the device KV memory in use (referenced, not merely cached)."""
        used = total = 0
        for m in self.managers:
            size = m.info.layout.nbytes
            used += (m.pool.num_blocks - m.pool.num_free_blocks) * size
            total += m.pool.num_blocks * size
        return used / total

    # ---- connector bookkeeping ------------------------------------------------------
    def take_newly_full(self) -> list[tuple[int, list[int], list[bytes]]]:
        """(group, block ids, hashes) computed full this step, per group that has any."""
        out = []
        for m in self.managers:
            full = m.take_newly_full()
            if full:
                out.append((m.index, [b for b, _ in full], [h for _, h in full]))
        return out

    def take_evicted(self) -> list[tuple[int, list[int], list[bytes]]]:
        out = []
        for m in self.managers:
            evicted = m.pool.take_evicted()
            if evicted:
                out.append((m.index, [b for b, _ in evicted], [h for _, h in evicted]))
        return out

    def reset_prefix_cache(self) -> bool:
        """Forget every idle cached block and checkpoint; refused while any is in use."""
        if any(m.pool.num_free_blocks != m.pool.num_blocks for m in self.managers):
            return False
        return all(m.pool.reset_prefix_cache() for m in self.managers)

    # ---- KV events (kvstore/events.py) ------------------------------------------------
    def enable_events(self, medium: str) -> None:
        """Record blocks published and evicted in every pool, from now on, as events on
        `medium`; take_events() must then be called every step (it drains them)."""
        for m in self.managers:  # pools first: a step on another thread may check event_medium
            if m.pool.events is None:
                m.pool.events = []
        self.event_medium = medium

    def _event_marks(self) -> list[int] | None:
        if self.event_medium is None:
            return None
        return [len(m.pool.events) for m in self.managers]

    def _annotate_events(self, request: Request, marks: list[int], cause: str | None) -> None:
        """Fill in what a pool cannot know of the blocks `request` just published: the
        parent hash (the request's previous block) and, for loaded blocks, the cause."""
        position = None
        for m, mark in zip(self.managers, marks):
            for rec in m.pool.events[mark:]:
                if rec[0] != STORED:
                    continue
                if position is None:
                    position = {h: i for i, h in enumerate(request.block_hashes)}
                i = position.get(rec[1])
                if i:
                    rec[4] = request.block_hashes[i - 1]
                if cause is not None:
                    rec[3] = cause

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, pool by pool, each in order."""
        out: list[KVEvent] = []
        medium = self.event_medium
        for m in self.managers:
            records = m.pool.events
            if not records:
                continue
            m.pool.events = []
            size, group = m.info.layout.nbytes, m.index
            for rec in records:
                if rec[0] == STORED:
                    out.append(BlockStored(rec[1], rec[4], rec[2], len(rec[2]), group, medium, size, rec[3]))
                elif rec[0] == REMOVED:
                    out.append(BlockRemoved(rec[1], group, medium, size))
                else:
                    out.append(AllBlocksCleared(medium))
        return out

    # ---- introspection --------------------------------------------------------------
    @property
    def usage(self) -> float:
        return max(1.0 - m.pool.num_free_blocks / m.pool.num_blocks for m in self.managers)

    def num_held_blocks(self, request_id: str) -> list[int]:
        """Blocks (state slots) a request holds now, per group."""
        return [sum(1 for b in m.block_ids(request_id) if b >= 0) for m in self.managers]

    def stats(self) -> dict:
        pools = [m.pool for m in self.managers]
        out = {
            "blocks": sum(p.num_blocks for p in pools),
            "free_blocks": sum(p.num_free_blocks for p in pools),
            "cached_blocks": sum(len(p.cached) for p in pools),
            "evictions": sum(p.num_evictions for p in pools),
            "prefix_query_tokens": self.prefix_queries,
            "prefix_hit_tokens": self.prefix_hits,
        }
        if len(pools) > 1:
            out["groups"] = [{"kind": m.group.kind, "layers": len(m.group.layers), "blocks": m.pool.num_blocks,
                              "free_blocks": m.pool.num_free_blocks, "cached_blocks": len(m.pool.cached)}
                             for m in self.managers]
        return out
