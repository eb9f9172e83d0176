"""The host-memory tier: one pre-allocated slab of fixed-size block slots, LRU-evicted.

One slot holds one whole block (page-first layout, DESIGN.md §3), so a put or a get is one
contiguous copy per block and the slab never fragments. The slab is allocated once at start
(pinned when CUDA is present, so host<->device copies can be asynchronous DMA) and its size
is the byte budget rounded down to whole slots: the capacity can never be exceeded.

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
    writes_inline = True  # a put is a memcpy into the slab
    supports_evict_hook = True

    def __init__(
        self,
        capacity_bytes: int,
        layout: BlockLayout,
        on_evict: EvictHook | None = None,
        pin_memory: bool | None = None,
        what: str = "cpu tier",
    ):
        super().__init__(capacity_bytes)
        num_slots = capacity_bytes // layout.nbytes
        if num_slots < 1:
            raise ValueError(
                f"{what}: capacity {capacity_bytes} bytes is smaller than one block "
                f"({layout.nbytes} bytes for shape {tuple(layout.shape)} {layout.dtype})"
            )
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.layout = layout
        self.num_slots = num_slots
        self.on_evict = on_evict
        self._shape = torch.Size(layout.shape)
        self._slab = torch.empty((num_slots, *layout.shape), dtype=layout.dtype, pin_memory=pin_memory)
        self._lock = threading.Lock()
        self._slot_of: OrderedDict[BlockKey, int] = OrderedDict()  # LRU first, MRU last
        self._owner: list[BlockKey | None] = [None] * num_slots  # which key a slot holds now
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        # Last CUDA event per stream that read the slab asynchronously: a slot must not be
        # overwritten before the DMA reading it has finished (events of a stream complete in
        # order, so the latest one covers the earlier ones).
        self._inflight: dict = {}

    @classmethod
    def from_spec(cls, spec: TierSpec, layout: BlockLayout) -> "CpuTier":
        spec.check_options(("pin",))
        if spec.size is None:
            raise ValueError(f"tier spec {spec.text!r}: the cpu tier needs a size, e.g. cpu:4GiB")
        pin = spec.bool_option("pin", torch.cuda.is_available())
        return cls(spec.size, layout, pin_memory=pin, what=f"tier spec {spec.text!r}")

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

    def keys_lru(self) -> list[BlockKey]:
        """Resident keys, least recently used first (for tests and introspection)."""
        with self._lock:
            return list(self._slot_of)

    # --- data movement ------------------------------------------------------------------
    def get(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]) -> list[bool]:
        if len(keys) != len(into):
            raise ValueError(f"cpu tier get: {len(keys)} keys but {len(into)} destination tensors")
        for dst in into:
            self._check_block(dst, "destination")
        start = time.perf_counter()
        ok = [False] * len(keys)
        hits = errors = 0
        devices: set[torch.device] = set()  # CUDA devices copied to asynchronously
        # The lock is held across the copies so no put can reuse a slot mid-copy.
        with self._lock:
            for i, (key, dst) in enumerate(zip(keys, into)):
                slot = self._slot_of.get(key)
                if slot is None:
                    continue
                if self._owner[slot] != key:  # never serve a slot that was handed to another key
                    errors += 1
                    continue
                self._slot_of.move_to_end(key)
                if dst.is_cuda:
                    dst.copy_(self._slab[slot], non_blocking=True)
                    devices.add(dst.device)
                else:
                    dst.copy_(self._slab[slot])
                ok[i] = True
                hits += 1
            for device in devices:
                stream = torch.cuda.current_stream(device)
                event = torch.cuda.Event()
                event.record(stream)
                self._inflight[(stream.device, stream.stream_id)] = event
        self._stats.add(
            hits=hits,
            misses=len(keys) - hits,
            errors=errors,
            bytes_read=hits * self.layout.nbytes,
            read_seconds=time.perf_counter() - start,
        )
        return ok

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """Store blocks with the semantics of putting them one by one (the last ones of a
        batch larger than the slab win); a key already present only becomes most recent."""
        if len(keys) != len(blocks):
            raise ValueError(f"cpu tier put: {len(keys)} keys but {len(blocks)} blocks")
        for block in blocks:
            self._check_block(block, "block")
        start = time.perf_counter()
        hook = self.on_evict
        evicted_keys: list[BlockKey] = []
        evicted_data: list[torch.Tensor] = []
        with self._lock:
            # Pass 1, metadata only: choose a slot for every new key.
            pending: dict[int, int] = {}  # slot -> index of the block to copy into it
            for i, key in enumerate(keys):
                if key in self._slot_of:
                    self._slot_of.move_to_end(key)
                    continue
                if self._free:
                    slot = self._free.pop()
                else:
                    old_key, slot = self._slot_of.popitem(last=False)
                    evicted_keys.append(old_key)
                    if hook is not None:
                        # Copy before the slot is overwritten; a block evicted by its own
                        # batch has not reached the slab yet, so take it from the source.
                        src = pending.pop(slot, None)
                        if src is None:
                            evicted_data.append(self._slab[slot].clone())
                        else:
                            evicted_data.append(blocks[src].detach().to("cpu", copy=True))
                    else:
                        pending.pop(slot, None)
                self._slot_of[key] = slot
                self._owner[slot] = key
                pending[slot] = i
            # Pass 2: one contiguous copy per block that ended up resident.
            if pending:
                self._wait_inflight()
            sources: set[torch.device] = set()
            for slot, i in pending.items():
                src = blocks[i]
                if src.is_cuda:  # queue all device->host DMAs, then wait once (not per block)
                    self._slab[slot].copy_(src, non_blocking=True)
                    sources.add(src.device)
                else:
                    self._slab[slot].copy_(src)
            for device in sources:  # the caller may reuse its blocks once put returns
                torch.cuda.current_stream(device).synchronize()
            used = len(self._slot_of) * self.layout.nbytes
        self._stats.add(
            puts=len(pending),
            evictions=len(evicted_keys),
            bytes_written=len(pending) * self.layout.nbytes,
            write_seconds=time.perf_counter() - start,
        )
        self._stats.set(used_bytes=used)
        # Outside the lock: the hook may enqueue work or even call back into this tier.
        if hook is not None and evicted_keys:
            hook(evicted_keys, evicted_data)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            for key in keys:
                slot = self._slot_of.pop(key, None)
                if slot is not None:
                    self._owner[slot] = None
                    self._free.append(slot)
            used = len(self._slot_of) * self.layout.nbytes
        self._stats.set(used_bytes=used)

    def close(self) -> None:
        with self._lock:
            self._wait_inflight()
            self._slot_of.clear()
            self._owner = [None] * self.num_slots
            self._free = list(range(self.num_slots - 1, -1, -1))
        self._stats.set(used_bytes=0)

    # --- helpers ------------------------------------------------------------------------
    def _check_block(self, t: torch.Tensor, what: str) -> None:
        if t.shape != self._shape or t.dtype != self.layout.dtype:
            raise ValueError(
                f"cpu tier: {what} has shape {tuple(t.shape)} {t.dtype}, "
                f"expected {tuple(self._shape)} {self.layout.dtype}"
            )

    def _wait_inflight(self) -> None:
        """Block until asynchronous reads of the slab are done (no-op without CUDA)."""
        for event in self._inflight.values():
            event.synchronize()
        self._inflight.clear()
