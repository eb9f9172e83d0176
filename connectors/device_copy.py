"""Tier saves and loads of device pools through a block-copy kernel and pinned staging.

Without it a save is `pool.index_select(0, ids).cpu()` (a device copy, then a transfer into
pageable memory) and a load is one small host-to-device copy per block. With a `BlockCopy`
(the engine passes the triton `gather_blocks` / `scatter_blocks` on CUDA, see
`ConnectorContext.block_copy`), a batch of blocks moves in one launch each way, between the
pool and a reusable pinned host buffer the kernel reads and writes directly.

Connectors never import the engine, so the kernels reach them as this small protocol.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Protocol

import torch

from kvtier.kvstore.keys import BlockKey

_MAX_FREE = 4  # staging buffers kept per block layout (one per concurrent loader is plenty)


class BlockCopy(Protocol):
    """Whole-block copies between a page-first pool and a staging buffer of the same layout."""

    def gather(self, pool: torch.Tensor, block_ids: torch.Tensor, staging: torch.Tensor) -> None:
        """staging[i] = pool[block_ids[i]]."""

    def scatter(self, staging: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor) -> None:
        """pool[block_ids[i]] = staging[i]."""


class StagingBuffers:
    """Reusable host buffers `[rows, *block_shape]`, pinned when the pool is on CUDA; handed
    out one at a time (loads run on several threads) and grown by powers of two."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[tuple, list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def rows(self, pool: torch.Tensor, n: int):
        key = (tuple(pool.shape[1:]), pool.dtype, pool.is_cuda)
        with self._lock:
            free = self._free.setdefault(key, [])
            # By position: list.remove would compare tensors with ==, elementwise.
            at = next((i for i, b in enumerate(free) if b.shape[0] >= n), None)
            buf = free.pop(at) if at is not None else None
        if buf is None:
            size = 1 << max(0, n - 1).bit_length()
            buf = torch.empty((size, *pool.shape[1:]), dtype=pool.dtype, pin_memory=pool.is_cuda)
        try:
            yield buf[:n]
        finally:
            with self._lock:
                free = self._free[key]
                free.append(buf)
                if len(free) > _MAX_FREE:
                    free.pop(min(range(len(free)), key=lambda i: free[i].shape[0]))


def _wait(pool: torch.Tensor) -> None:
    if pool.is_cuda:
        torch.cuda.current_stream(pool.device).synchronize()


def _ids(block_ids: Sequence[int], pool: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(block_ids), dtype=torch.int32, device=pool.device)


class DeviceBlockMover:
    """Saves and loads of one connector through `copy` (thread-safe: loads run on loader threads)."""

    def __init__(self, copy: BlockCopy):
        self.copy = copy
        self.staging = StagingBuffers()

    def warm_up(self, pools: Sequence[torch.Tensor]) -> None:
        """Copy block 0 of each pool out to staging and back (an identity) so the kernels
        compile now, not inside the first load that a request waits on."""
        for pool in pools:
            if pool.shape[0] == 0:
                continue
            with self.staging.rows(pool, 1) as staged:
                zero = _ids([0], pool)
                self.copy.gather(pool, zero, staged)
                self.copy.scatter(staged, pool, zero)
                _wait(pool)

    def store(self, hierarchy, pool: torch.Tensor, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> None:
        """Gather the blocks into staging in one launch, then hand them to the hierarchy
        (whose `store` returns once the staging rows may be reused)."""
        with self.staging.rows(pool, len(block_ids)) as staged:
            self.copy.gather(pool, _ids(block_ids, pool), staged)
            _wait(pool)  # the kernel writes the host buffer: done before anyone reads it
            hierarchy.store(keys, list(staged.unbind(0)))

    def load(self, hierarchy, pools: Sequence[torch.Tensor], block_ids: Sequence[int], keys: Sequence[BlockKey],
             sources: Sequence[int]) -> list[bool]:
        """Read the blocks into staging (one buffer per KV group), then scatter the ones that
        loaded into their pools, one launch per group. Returns the hierarchy's ok flags."""
        by_group: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_group.setdefault(k.group, []).append(i)
        with contextlib.ExitStack() as stack:
            into: list[torch.Tensor | None] = [None] * len(keys)
            staged = {}
            for g, rows in by_group.items():
                staged[g] = stack.enter_context(self.staging.rows(pools[g], len(rows)))
                for r, i in enumerate(rows):
                    into[i] = staged[g][r]
            ok = hierarchy.load(keys, into, sources)
            for g, rows in by_group.items():
                good = [r for r, i in enumerate(rows) if ok[i]]
                for j, r in enumerate(good):  # pack the loaded rows to the front (j <= r)
                    if j != r:
                        staged[g][j].copy_(staged[g][r])
                if good:
                    pool = pools[g]
                    self.copy.scatter(staged[g][: len(good)], pool, _ids([block_ids[rows[r]] for r in good], pool))
            for g in by_group:
                _wait(pools[g])  # the pool holds the blocks, and staging may be reused
        return ok
