"""The host-memory tier: LRU-evicted block slots under one byte budget shared by all KV groups.

A tier serves one or more block layouts (one per KV group of a hybrid model: sliding-window
attention, full attention, SSM state; their blocks may differ in size by 100x). Capacity is a
single byte budget over all of them, never split per group: one LRU order covers every key,
and a put evicts the least recently used blocks, whatever their layout, until its own bytes
fit. `used_bytes` (the resident blocks, each counted at its own size) never exceeds it.

Storage. One slot holds one whole block (page-first layout, DESIGN.md §3), so a put or a get
is one contiguous copy per block. Slot memory is pinned when CUDA is present, so host<->device
copies can be asynchronous DMA.
- One layout (the common case): the budget is allocated once at start as a slab of
  `capacity // block` slots, exactly as before layouts were added: no allocation ever after.
- Several layouts: each slot is its own tensor, allocated when its layout runs out of spare
  slots. An evicted or deleted slot stays with its layout as a spare (the next put of that
  layout reuses it without allocating); spares of other layouts are released only when a put
  needs their bytes. Allocated memory (resident + spare) therefore stays within the budget,
  and any mix of blocks whose sizes add up to the budget fits. Whole-slot release is what
  makes that exact: memory carved in multi-slot chunks could be stranded by one live block.

Eviction hands the evicted blocks to an optional hook (`set_evict_hook`, or `on_evict` at
construction; copies, taken before the slot is reused) so a write-back hierarchy can push
them to the next tier. A put is a memcpy, so the hierarchy runs it inline (`writes_inline`).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.base import EvictHook, Tier
from kvtier.kvstore.tiers.spec import BlockLayout, TierSpec


class CpuTier(Tier):
    name = "cpu"
    remote = False
    writes_inline = True  # a put is a memcpy into host memory
    supports_evict_hook = True

    def __init__(
        self,
        capacity_bytes: int,
        layouts: Sequence[BlockLayout] | BlockLayout,
        on_evict: EvictHook | None = None,
        pin_memory: bool | None = None,
        what: str = "cpu tier",
    ):
        super().__init__(capacity_bytes)
        if isinstance(layouts, BlockLayout):
            layouts = (layouts,)
        # Groups with the same block shape and dtype share slots (the device does not matter here).
        unique: dict[tuple, BlockLayout] = {}
        for layout in layouts:
            if not isinstance(layout, BlockLayout):
                raise ValueError(f"{what}: expected BlockLayout objects, got {layout!r}")
            unique.setdefault((torch.Size(layout.shape), layout.dtype), layout)
        if not unique:
            raise ValueError(f"{what}: needs at least one block layout")
        self.layouts: tuple[BlockLayout, ...] = tuple(unique.values())
        largest = max(self.layouts, key=lambda l: l.nbytes)
        if capacity_bytes < largest.nbytes:
            raise ValueError(
                f"{what}: capacity {capacity_bytes} bytes is smaller than one block "
                f"({largest.nbytes} bytes for shape {tuple(largest.shape)} {largest.dtype}); "
                "a tier must hold at least one block of every layout"
            )
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.on_evict = on_evict
        self._pin = pin_memory
        self._kind_of = {shape_dtype: i for i, shape_dtype in enumerate(unique)}
        self._layout_nbytes = [l.nbytes for l in self.layouts]
        self._lock = threading.Lock()
        self._slot_of: OrderedDict[BlockKey, int] = OrderedDict()  # LRU first, MRU last
        # Per slot id: its memory (None once released), layout index, size, and current key.
        self._view: list[torch.Tensor | None] = []
        self._kind: list[int] = []
        self._size: list[int] = []
        self._owner: list[BlockKey | None] = []
        self._free: list[list[int]] = [[] for _ in self.layouts]  # spare slots with memory
        self._dead: list[int] = []  # slot ids whose memory was released, reusable ids
        self._used = 0  # bytes of resident blocks
        self._allocated = 0  # bytes of slot memory held (resident + spare) <= capacity
        self._preallocated = 0
        if len(self.layouts) == 1:
            self._preallocate(capacity_bytes // largest.nbytes)
        # Last CUDA event per stream that read slot memory asynchronously: a slot must not be
        # overwritten or released before the DMA reading it has finished (events of a stream
        # complete in order, so the latest one covers the earlier ones).
        self._inflight: dict = {}

    @classmethod
    def from_spec(cls, spec: TierSpec, layouts: Sequence[BlockLayout] | BlockLayout) -> "CpuTier":
        spec.check_options(("pin",))
        if spec.size is None:
            raise ValueError(f"tier spec {spec.text!r}: the cpu tier needs a size, e.g. cpu:4GiB")
        pin = spec.bool_option("pin", torch.cuda.is_available())
        return cls(spec.size, layouts, pin_memory=pin, what=f"tier spec {spec.text!r}")

    def set_evict_hook(self, hook: EvictHook | None) -> None:
        self.on_evict = hook

    # --- lookups: no side effects (no LRU change) ----------------------------------------
    def lookup_prefix(self, keys: Sequence[BlockKey]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._slot_of:
                    break
                n += 1
        return n

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        with self._lock:
            return [key in self._slot_of for key in keys]

    def __len__(self) -> int:
        with self._lock:
            return len(self._slot_of)

    @property
    def allocated_bytes(self) -> int:
        """Slot memory held (resident blocks plus spares); never above the capacity."""
        with self._lock:
            return self._allocated

    def keys_lru(self) -> list[BlockKey]:
        """Resident keys, least recently used first (for tests and introspection)."""
        with self._lock:
            return list(self._slot_of)

    # --- data movement ------------------------------------------------------------------
    def get(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(into):
            raise ValueError(f"cpu tier get: {len(keys)} keys but {len(into)} destination tensors")
        kinds = [self._kind_for(dst, "destination") for dst in into]
        start = time.perf_counter()
        ok = [False] * len(keys)
        hits = errors = nbytes = 0
        devices: set[torch.device] = set()  # CUDA devices copied to asynchronously
        # The lock is held across the copies so no put can reuse a slot mid-copy.
        with self._lock:
            for i, (key, dst) in enumerate(zip(keys, into)):
                slot = self._slot_of.get(key)
                if slot is None:
                    continue
                # Never serve a slot handed to another key, nor a block into another layout.
                if self._owner[slot] != key or self._kind[slot] != kinds[i]:
                    errors += 1
                    continue
                self._slot_of.move_to_end(key)
                if dst.is_cuda:
                    dst.copy_(self._view[slot], non_blocking=True)
                    devices.add(dst.device)
                else:
                    dst.copy_(self._view[slot])
                ok[i] = True
                hits += 1
                nbytes += self._size[slot]
            for device in devices:
                stream = torch.cuda.current_stream(device)
                event = torch.cuda.Event()
                event.record(stream)
                self._inflight[(stream.device, stream.stream_id)] = event
        self._stats.add(
            hits=hits,
            misses=len(keys) - hits,
            errors=errors,
            bytes_read=nbytes,
            read_seconds=time.perf_counter() - start,
        )
        return ok

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """Store blocks with the semantics of putting them one by one (the last ones of a
        batch larger than the budget win); a key already present only becomes most recent."""
        if len(keys) != len(blocks):
            raise ValueError(f"cpu tier put: {len(keys)} keys but {len(blocks)} blocks")
        kinds = [self._kind_for(block, "block") for block in blocks]
        start = time.perf_counter()
        hook = self.on_evict
        evicted_keys: list[BlockKey] = []
        evicted_data: list[torch.Tensor] = []
        capacity = self.capacity_bytes
        events = self._events if self._events is not None and self._events.active else None
        changes: list | None = [] if events is not None else None  # (stored?, key, size) in order
        with self._lock:
            # Pass 1, metadata only: evict until each new block fits, then choose its slot.
            pending: dict[int, int] = {}  # slot -> index of the block to copy into it
            for i, key in enumerate(keys):
                if key in self._slot_of:
                    self._slot_of.move_to_end(key)
                    continue
                kind = kinds[i]
                size = self._layout_nbytes[kind]
                while self._used + size > capacity:
                    old_key, old = self._slot_of.popitem(last=False)
                    evicted_keys.append(old_key)
                    # A block evicted by its own batch has not been copied in yet.
                    src = pending.pop(old, None)
                    if hook is not None:  # copy before the slot can be reused or released
                        if src is None:
                            evicted_data.append(self._view[old].clone())
                        else:
                            evicted_data.append(blocks[src].detach().to("cpu", copy=True))
                    self._owner[old] = None
                    self._used -= self._size[old]
                    self._free[self._kind[old]].append(old)
                    if changes is not None:
                        changes.append((False, old_key, self._size[old]))
                free = self._free[kind]
                slot = free.pop() if free else self._new_slot(kind)
                self._slot_of[key] = slot
                self._owner[slot] = key
                self._used += size
                pending[slot] = i
                if changes is not None:
                    changes.append((True, key, size))
            # Pass 2: one contiguous copy per block that ended up resident.
            if pending:
                self._wait_inflight()
            sources: set[torch.device] = set()
            written = 0
            for slot, i in pending.items():
                src = blocks[i]
                if src.is_cuda:  # queue all device->host DMAs, then wait once (not per block)
                    self._view[slot].copy_(src, non_blocking=True)
                    sources.add(src.device)
                else:
                    self._view[slot].copy_(src)
                written += self._size[slot]
            for device in sources:  # the caller may reuse its blocks once put returns
                torch.cuda.current_stream(device).synchronize()
            used = self._used
            if changes:  # under the lock: concurrent puts publish in the order they applied
                events.replay(changes)
        self._stats.add(
            puts=len(pending),
            evictions=len(evicted_keys),
            bytes_written=written,
            write_seconds=time.perf_counter() - start,
        )
        self._stats.set(used_bytes=used)
        # Outside the lock: the hook may enqueue work or even call back into this tier.
        if hook is not None and evicted_keys:
            hook(evicted_keys, evicted_data)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        gone: list[tuple[BlockKey, int]] = []
        with self._lock:
            for key in keys:
                slot = self._slot_of.pop(key, None)
                if slot is not None:
                    gone.append((key, self._size[slot]))
                    self._owner[slot] = None
                    self._used -= self._size[slot]
                    self._free[self._kind[slot]].append(slot)  # kept as a spare
            used = self._used
            if gone and self._events is not None:
                self._events.removed([k for k, _ in gone], "deleted", [s for _, s in gone])
        self._stats.set(used_bytes=used)

    def close(self) -> None:
        with self._lock:
            self._wait_inflight()
            self._slot_of.clear()
            self._used = 0
            self._free = [[] for _ in self.layouts]
            for slot in range(len(self._view)):
                self._owner[slot] = None
                if slot >= self._preallocated and self._view[slot] is not None:
                    self._release(slot)
            if self._preallocated:
                self._free[0] = list(range(self._preallocated - 1, -1, -1))
        self._stats.set(used_bytes=0)
        if self._events is not None:
            self._events.cleared()

    # --- helpers ------------------------------------------------------------------------
    def _kind_for(self, t: torch.Tensor, what: str) -> int:
        kind = self._kind_of.get((t.shape, t.dtype))
        if kind is None:
            expected = " or ".join(f"{tuple(l.shape)} {l.dtype}" for l in self.layouts)
            raise ValueError(f"cpu tier: {what} has shape {tuple(t.shape)} {t.dtype}, expected {expected}")
        return kind

    def _preallocate(self, num_slots: int) -> None:
        layout = self.layouts[0]
        slab = torch.empty((num_slots, *layout.shape), dtype=layout.dtype, pin_memory=self._pin)
        self._view = list(slab.unbind(0))  # views made once, not per copy
        self._kind = [0] * num_slots
        self._size = [layout.nbytes] * num_slots
        self._owner = [None] * num_slots
        self._free[0] = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self._allocated = num_slots * layout.nbytes
        self._preallocated = num_slots

    def _new_slot(self, kind: int) -> int:
        """Memory for one more block of layout `kind`, releasing spare slots of other layouts
        until it fits the budget. It always does once the LRU pass made room: allocated
        memory is resident bytes plus spares, and this layout has no spare left."""
        layout, size = self.layouts[kind], self._layout_nbytes[kind]
        if self._allocated + size > self.capacity_bytes:
            self._wait_inflight()  # a DMA may still read a spare about to be released
            for free in self._free:
                while free and self._allocated + size > self.capacity_bytes:
                    self._release(free.pop())
        view = torch.empty(layout.shape, dtype=layout.dtype, pin_memory=self._pin)
        if self._dead:
            slot = self._dead.pop()
            self._view[slot], self._kind[slot], self._size[slot] = view, kind, size
        else:
            slot = len(self._view)
            self._view.append(view)
            self._kind.append(kind)
            self._size.append(size)
            self._owner.append(None)
        self._allocated += size
        return slot

    def _release(self, slot: int) -> None:
        self._view[slot] = None
        self._allocated -= self._size[slot]
        self._dead.append(slot)

    def _wait_inflight(self) -> None:
        """Block until asynchronous reads of slot memory are done (no-op without CUDA)."""
        for event in self._inflight.values():
            event.synchronize()
        self._inflight.clear()
