"""Device KV block pool: reference counts, an LRU free queue and the prefix-hash map.

Free blocks keep their hash until they are handed out again (lazy eviction), so a finished
or preempted request's prefix stays reusable until the memory is really needed. The free
queue is a doubly linked list: taking a cached block back out of it is O(1).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

# KV event records a pool keeps while events are on (engine/kv_cache/coordinator.py turns
# them into kvstore.events objects once per step): [STORED, hash, token_ids, cause, parent],
# (REMOVED, hash), (CLEARED,). Stored records are lists: the coordinator fills in the parent
# hash and the cause, which only it knows.
STORED, REMOVED, CLEARED = 0, 1, 2


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to verify hits against collisions
        self.prev: KVBlock | None = None
        self.next: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """LRU order: blocks are taken from the head, freed blocks join the tail."""

    def __init__(self, blocks: Iterable[KVBlock]):
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev
        last.next, block.prev = block, last
        block.next, self._tail.prev = self._tail, block
        self.size += 1

    def appendleft(self, block: KVBlock) -> None:
        first = self._head.next
        self._head.next, block.prev = block, self._head
        block.next, first.prev = first, block
        self.size += 1

    def remove(self, block: KVBlock) -> None:
        if block.prev is None or block.next is None:
            raise RuntimeError(f"{block} is not in the free queue")
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.size -= 1

    def popleft(self) -> KVBlock:
        if self.size == 0:
            raise RuntimeError("no free KV blocks")
        block = self._head.next
        self.remove(block)
        return block

    def __iter__(self):
        node = self._head.next
        while node is not self._tail:
            yield node
            node = node.next


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, record_evictions: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"KV pool must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0
        # (block id, hash) of cached blocks handed out again since the last take_evicted():
        # a write-back connector copies them out before the forward overwrites them. Only
        # recorded for a consumer that drains it every step (else it would grow forever).
        self.record_evictions = record_evictions
        self.evicted: list[tuple[int, bytes]] = []
        # KV event records since the last take (None: events off, the hot path's only cost)
        self.events: list | None = None

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.size

    def get_cached_block(self, block_hash: bytes, token_ids: Sequence[int]) -> KVBlock | None:
        """The block holding exactly these tokens under this hash, or None."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None  # a hash collision must never serve another prefix's KV
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks, pulling idle ones out of the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        if n > self.free_queue.size:
            raise RuntimeError(f"asked for {n} KV blocks, {self.free_queue.size} free")
        out = []
        for _ in range(n):
            b = self.free_queue.popleft()
            if b.block_hash is not None and self.record_evictions:
                self.evicted.append((b.block_id, b.block_hash))
            self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def free(self, blocks: Iterable[KVBlock], first_out: bool = False) -> None:
        """Drop one reference each; blocks reaching zero join the LRU tail in the given order
        (first_out: the head instead, to be reused before anything else, still reusable
        from the prefix cache until then)."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"double free of {b}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                if first_out:
                    self.free_queue.appendleft(b)
                else:
                    self.free_queue.append(b)

    def cache_block(self, block: KVBlock, block_hash: bytes, token_ids: Sequence[int]) -> bool:
        """Publish a full block under its hash; False if already published (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block
        if self.events is not None:
            self.events.append([STORED, block_hash, block.token_ids, "computed", None])
        return True

    def take_evicted(self) -> list[tuple[int, bytes]]:
        out, self.evicted = self.evicted, []
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                self.num_evictions += 1
                if self.events is not None:
                    self.events.append((REMOVED, block.block_hash))
            block.block_hash = None
            block.token_ids = None

    def reset_prefix_cache(self) -> bool:
        """Forget every idle cached block; refused while any block is in use."""
        if self.free_queue.size != self.num_blocks:
            return False
        events, self.events = self.events, None  # one "all cleared", not a removal per block
        for b in self.blocks:
            self._evict(b)
        if events is not None:
            events.append((CLEARED,))
            self.events = events
        return True
