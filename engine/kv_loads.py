"""The scheduler's dealings with a connector: requests in WAITING_FOR_KV and the loads run
for them, loads shared between requests, and the blocks handed over for saving each step.

A request whose prefix continues in a connector beyond its device hit gets device blocks
for the external tokens and waits here until the connector reports the load. While it
loads, the hashes of the blocks it loads are "pending". Another waiting request whose next
block (the first one past its own device hit) is pending does not load that block again:
it is passed over until the load lands, and then finds the blocks in the device prefix
cache, shared by reference count like any other cached block. If the load failed, the
blocks that did not load are not published and the waiting request looks the rest up
itself. The rule needs nothing from the connector and holds for every KV group, because
all groups key their blocks by the same chained hash at the same position.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from kvtier.connectors.base import LoadResult
from kvtier.engine.kv_cache.coordinator import KVCacheCoordinator
from kvtier.engine.request import Request, RequestStatus


@dataclass
class LandedLoad:
    request: Request
    device_tokens: int  # the device resume point it had before the load
    result: LoadResult


class KVLoads:
    def __init__(self, kv: KVCacheCoordinator, connector):
        """connector: the scheduler half (a ConnectorGuard in the engine)."""
        self.kv = kv
        self.connector = connector
        # request id -> (request, device resume point, resume point once loaded)
        self.loading: dict[str, tuple[Request, int, int]] = {}
        self._pending: dict[bytes, int] = {}  # hash of a block being loaded -> loads of it
        # request id of a timed-out load -> the stand-in holding its blocks until it reports
        self.unsettled: dict[str, Request] = {}
        self.num_shared_waits = 0  # times a request waited for another's load instead of loading

    def __bool__(self) -> bool:
        return bool(self.loading)

    def _hashes(self, req: Request, device_tokens: int, resume_tokens: int) -> list[bytes]:
        bs = self.kv.block_size
        return req.block_hashes[device_tokens // bs:resume_tokens // bs]

    def waits_for_shared(self, req: Request, num_device_tokens: int) -> bool:
        """True when the block after `req`'s device hit is being loaded for another request:
        it waits for that load rather than loading the block a second time."""
        if not self._pending:
            return False
        i = num_device_tokens // self.kv.block_size
        if i >= (req.num_tokens - 1) // self.kv.block_size or self._pending.get(req.block_hashes[i], 0) == 0:
            return False
        self.num_shared_waits += 1
        return True

    def start(self, req: Request, device_tokens: int, num_external: int) -> None:
        """Record a load into the blocks allocate_slots reserved and tell the connector."""
        resume_tokens = device_tokens + num_external
        req.num_computed_tokens = device_tokens
        req.status = RequestStatus.WAITING_FOR_KV
        self.loading[req.request_id] = (req, device_tokens, resume_tokens)
        for h in self._hashes(req, device_tokens, resume_tokens):
            self._pending[h] = self._pending.get(h, 0) + 1
        block_ids = self.kv.load_block_ids(req, device_tokens, resume_tokens)
        self.connector.on_allocated(req, block_ids, num_external)

    def time_out(self, request_id: str) -> Request | None:
        """A load the connector did not report in time. It may still be writing into the
        load's blocks, so a stand-in takes over every block the request holds until the
        connector reports the load (settle_late). Returns the request, to recompute in new
        blocks; None for an unknown id, a request that ended meanwhile, or a prefetch."""
        entry = self.loading.pop(request_id, None)
        if entry is None:
            return None
        self._unpend(*entry)
        req = entry[0]
        stand_in = copy.copy(req)
        stand_in.request_id = f"{request_id}#timed-out-load"
        self.kv.transfer(req, stand_in)
        self.unsettled[request_id] = stand_in
        if req.is_finished or req.prefetch_only:
            return None
        req.num_computed_tokens = 0
        req.load_timed_out = True
        return req

    def settle_late(self, request_ids) -> None:
        """The connector reported these timed-out loads at last: their blocks are free to reuse."""
        for rid in request_ids:
            stand_in = self.unsettled.pop(rid, None)
            if stand_in is not None:
                self.kv.free(stand_in)

    def _unpend(self, req: Request, device_tokens: int, resume_tokens: int) -> None:
        for h in self._hashes(req, device_tokens, resume_tokens):
            n = self._pending.pop(h, 0) - 1
            if n > 0:
                self._pending[h] = n

    def land(self, request_id: str, result: LoadResult) -> LandedLoad | None:
        """The connector reported a load: publish the blocks that loaded intact and set the
        request's resume point. None for an unknown id (a late or repeated report)."""
        entry = self.loading.pop(request_id, None)
        if entry is None:
            return None
        req, device_tokens, resume_tokens = entry
        self._unpend(req, device_tokens, resume_tokens)
        loaded = self.kv.loaded_tokens(device_tokens, resume_tokens, result)
        if req.is_finished or req.prefetch_only:  # aborted while loading, or only a prefetch
            if req.prefetch_only:
                self.kv.publish_loaded(req, loaded)
            self.kv.free(req)
            return None
        req.num_computed_tokens = loaded
        self.kv.publish_loaded(req, loaded)
        return LandedLoad(req, device_tokens, result)

    def notify_connector(self) -> None:
        """Hand the connector this step's newly computed and about-to-be-overwritten blocks
        (recorded only when a connector exists: the coordinator's track_transfers)."""
        if self.connector is None:
            return
        for group, block_ids, hashes in self.kv.take_evicted():
            self.connector.blocks_evicted(block_ids, hashes, group)
        for group, block_ids, hashes in self.kv.take_newly_full():
            self.connector.request_blocks_saved(block_ids, hashes, group)

    def sources(self, landed: LandedLoad) -> dict[str, int]:
        """Where the loaded tokens came from; a connector that names no source gets its name."""
        if landed.result.sources:
            return landed.result.sources
        n = landed.request.num_computed_tokens - landed.device_tokens
        return {getattr(self.connector, "name", "connector"): n} if n > 0 else {}
