"""Owns which device blocks each request holds. Only the scheduler calls it (docs/architecture.md §2)."""
from __future__ import annotations

from kvtier.engine.block_hash import extend_block_hashes
from kvtier.engine.block_pool import BlockPool, KVBlock
from kvtier.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, track_transfers: bool = False):
        """track_transfers: record newly full and evicted blocks for a connector, which
        drains them every step (Scheduler._notify_connector); off without one."""
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.track_transfers = track_transfers
        self.pool = BlockPool(num_blocks, enable_caching, record_evictions=track_transfers)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_published: dict[str, int] = {}  # leading blocks of a request already in the hash map
        # (block id, hash) of blocks computed full since the last take_newly_full(): a
        # write-through connector saves them after the forward.
        self.newly_full: list[tuple[int, bytes]] = []
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found on the device

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, request: Request) -> None:
        """Hash every full block of the request that is not hashed yet."""
        if not self.enable_caching or request.num_tokens // self.block_size == len(request.block_hashes):
            return
        tokens = request.prompt_token_ids + request.output_token_ids
        extend_block_hashes(request.block_hashes, request.hash_root, tokens, len(tokens), self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest run of cached full blocks from the start of the request (no side effects).

        At least one token is always left to compute, so the step produces logits.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for i, h in enumerate(request.block_hashes[:max_blocks]):
            tokens = request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size)
            block = self.pool.get_cached_block(h, tokens)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
        num_external_tokens: int = 0,
    ) -> list[KVBlock] | None:
        """Reserve room for `num_new_tokens` to compute (plus `num_external_tokens` a connector
        will load); None when the pool cannot fit them. Blocks to be loaded are published
        only once the load succeeds (publish_loaded)."""
        computed_blocks = computed_blocks or []
        held = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_external_tokens + num_new_tokens
        needed = self.blocks_needed(total) - len(held) - len(computed_blocks)
        # Cached hits that sit idle in the free queue stop being free once we touch them.
        idle_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - idle_hits:
            return None
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(max(needed, 0))
        blocks = self.req_blocks.setdefault(request.request_id, [])
        blocks.extend(computed_blocks)
        blocks.extend(new_blocks)
        if num_external_tokens == 0:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens, computed=True)
        return new_blocks

    def publish_loaded(self, request: Request, num_tokens: int) -> None:
        """A connector filled the request's blocks up to num_tokens: make them shareable."""
        self._cache_full_blocks(request, self.req_blocks[request.request_id], num_tokens, computed=False)

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int, computed: bool) -> None:
        """Publish blocks that will be full once this step's tokens are computed (or loaded)."""
        if not self.enable_caching:
            return
        bs = self.block_size
        start = self.num_published.get(request.request_id, 0)
        end = min(num_tokens // bs, len(request.block_hashes))
        for i in range(start, end):
            tokens = request.token_ids_slice(i * bs, (i + 1) * bs)
            if self.pool.cache_block(blocks[i], request.block_hashes[i], tokens) and computed and self.track_transfers:
                self.newly_full.append((blocks[i].block_id, request.block_hashes[i]))
        self.num_published[request.request_id] = max(start, end)

    def take_newly_full(self) -> list[tuple[int, bytes]]:
        out, self.newly_full = self.newly_full, []
        return out

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def free(self, request: Request) -> None:
        # Reverse order: a prefix's tail is evicted before its head, which more requests share.
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_published.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks
