"""The built-in connector: device pool <-> a TierHierarchy (cpu -> lmdb -> redis|grpc).

Config (`kv_connector_config`, or built from `kv_tiers`):
    tiers: list of tier specs ("cpu:4GiB", "lmdb:/path?size=8GiB", ...) or Tier objects
    write_policy: "write-through" (default) or "write-back"
    load_or_recompute: True (default): load a prefix from a slow tier only where that beats
        recomputing it, judged from each tier's measured bandwidth and the engine's
        measured prefill speed.
    lookup_budget_s: 0.25 (default): how long a request waits for a remote tier's lookup
        answer before it goes on with what the local tiers hold (remote_lookup.py)
    lookup_wait_s: 0.005 (default): how long one engine step waits for remote answers in all
Loads run on a background thread into blocks the scheduler reserved for a WAITING_FOR_KV
request, so the engine loop keeps stepping other requests meanwhile. Lookups in remote
tiers run on a thread pool too: `lookup` returns None ("ask again next step") while one is
due, so the engine loop never waits on a remote store beyond `lookup_wait_s` per step.

The scheduler asks `lookup` about the head waiting request every step until it is admitted;
while it waits for device room, the tiers' answer is reused for LOOKUP_REUSE_S instead of
paying a round trip to a remote store each step. A reused answer may be stale; that is
safe: a block gone by load time fails its load and the rest of the prefix is recomputed.

Caught faults (a load that crashed, a lookup that raised or missed its budget) are logged
once per kind (kvstore/faults.py) and counted in stats()["connector"].
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time

import torch

from kvtier.connectors.base import (
    Request,
    ConnectorContext,
    ConnectorMetadata,
    ConnectorOutput,
    KVConnector,
    LoadResult,
    LoadSpec,
    SaveSpec,
)
from kvtier.connectors.device_copy import DeviceBlockMover
from kvtier.connectors.remote_lookup import LookupBudget, RemoteLookups
from kvtier.kvstore.faults import FaultLog
from kvtier.kvstore.hierarchy import TierHierarchy
from kvtier.kvstore.serial_torch import serial_torch_thread
from kvtier.kvstore.tiers.base import Tier
from kvtier.kvstore.tiers.spec import build_tier

_POLICIES = ("write-through", "write-back")
LOOKUP_REUSE_S = 0.5
LOADER_THREADS = 4
_MAX_REMEMBERED = 1024  # remembered lookups, for requests that wait a long time or go away
# get_finished(wait=True) waits at most this long, so an idle engine loop still comes back
# soon (for requests added meanwhile) while a load or lookup on a slow store drags on.
IDLE_WAIT_S = 0.05
_KEYS = {"tiers", "write_policy", "load_or_recompute", "lookup_budget_s", "lookup_wait_s"}
log = logging.getLogger(__name__)


def plan_prefix_load(block_costs: list[float], recompute_cost: float) -> int:
    """Blocks worth loading: the prefix length n minimising load(0..n) + recompute(n..).

    block_costs[i] is the seconds to load block i; recomputing any block costs
    recompute_cost. Loading can stop early: a slow tail is recomputed instead.
    """
    best_n, best_gain, gain = 0, 0.0, 0.0
    for i, cost in enumerate(block_costs):
        gain += recompute_cost - cost
        if gain > best_gain:
            best_n, best_gain = i + 1, gain
    return best_n


class TieredConnector(KVConnector):
    def __init__(self, config: dict, context: ConnectorContext):
        super().__init__(config, context)
        unknown = set(self.config) - _KEYS
        if unknown:
            raise ValueError(f"kv_connector_config: unknown key(s) {', '.join(sorted(unknown))}")
        specs = self.config.get("tiers")
        if not specs or not isinstance(specs, (list, tuple)):
            raise ValueError("kv_connector_config: 'tiers' must be a non-empty list, e.g. ['cpu:4GiB']")
        self.write_policy = self.config.get("write_policy", "write-through")
        if self.write_policy not in _POLICIES:
            raise ValueError(f"kv_connector_config: write_policy must be one of {', '.join(_POLICIES)}")
        self.load_or_recompute = bool(self.config.get("load_or_recompute", True))
        defaults = LookupBudget()
        budget = LookupBudget(self.config.get("lookup_budget_s", defaults.budget_s),
                              self.config.get("lookup_wait_s", defaults.wait_s))
        tiers = []
        try:
            for spec in specs:
                tiers.append(spec if isinstance(spec, Tier) else build_tier(spec, [g.layout for g in context.groups]))
        except Exception:
            for t in tiers:
                t.close()
            raise
        self.hierarchy = TierHierarchy(tiers, write_policy=self.write_policy)
        self.faults = FaultLog(log)
        self._remote = RemoteLookups(self.hierarchy.tiers, self.hierarchy.names, budget, self.faults)
        self._lookups: dict[str, tuple[list, list[int]]] = {}
        # request id -> (when, first block, last block, keys, tier of each block found)
        self._recent: dict[str, tuple[float, int, int, list, list[int]]] = {}
        self._meta = ConnectorMetadata()
        # Several loaders: a load stuck on a frozen remote store (until that store's own
        # timeout) must not hold up other requests' loads from healthy tiers.
        self._loader = cf.ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="kvtier-load",
                                             initializer=serial_torch_thread)
        self._loads: dict[str, tuple[cf.Future, int]] = {}  # request id -> (load, its blocks)
        self.num_crashed_loads = 0
        # CUDA pools: saves and loads through one block-copy launch and pinned staging.
        self._mover = DeviceBlockMover(context.block_copy) if context.block_copy is not None else None

    def register_kv_caches(self, kv_pools) -> None:
        super().register_kv_caches(kv_pools)
        if self._mover is not None:
            self._mover.warm_up(self.kv_pools)

    # ---- scheduler side ------------------------------------------------------------
    def lookup(self, request: Request, num_device_tokens: int) -> int | None:
        bs = self.context.block_size
        first = num_device_tokens // bs
        last = (request.num_tokens - 1) // bs  # always leave one token to compute
        if last <= first:
            return 0
        now = time.monotonic()
        seen = self._recent.get(request.request_id)
        if seen is not None and seen[1:3] == (first, last) and now - seen[0] < LOOKUP_REUSE_S:
            keys, locations = seen[3], seen[4]
        else:
            keys = self._probe_keys(request, first, last)
            locations = self._remote.lookup(request.request_id, keys, prefix=self.context.dense)
            if locations is None:
                return None  # a remote tier's answer is due; asked again next step
            if len(self._recent) >= _MAX_REMEMBERED:
                self._recent = {r: s for r, s in self._recent.items() if now - s[0] < LOOKUP_REUSE_S}
            self._recent[request.request_id] = (now, first, last, keys, locations)
        if not self.context.dense:
            return self._plan_hybrid(request.request_id, first, last, keys, locations)
        n = self._blocks_worth_loading(locations)
        self._lookups[request.request_id] = (keys[:n], locations[:n])
        return n * bs

    def _probe_keys(self, request: Request, first: int, last: int) -> list:
        """Dense: the blocks after the device hit. Hybrid: those of every group (for an SSM
        group, the checkpoints at each of their ends), group after group."""
        hashes = request.block_hashes[first:last]
        return [self.context.key(h, g) for g in range(len(self.context.groups)) for h in hashes]

    def _plan_hybrid(self, request_id: str, first: int, last: int, keys: list, where: list) -> int:
        """The longest resume point every group can load, if loading it beats recomputing."""
        bs, span = self.context.block_size, last - first
        for n in range(last, first, -1):
            picks = [g * span + i - first for g, info in enumerate(self.context.groups)
                     for i in info.blocks_to_load(first * bs, n * bs, bs)]
            locations = [where[p] for p in picks]
            if any(loc is None for loc in locations):
                continue
            if not self._worth_loading([keys[p] for p in picks], locations, (n - first) * bs):
                return 0
            self._lookups[request_id] = ([keys[p] for p in picks], locations)
            return (n - first) * bs
        return 0

    def _worth_loading(self, keys: list, locations: list[int], num_tokens: int) -> bool:
        speed = self.context.prefill_tokens_per_s()
        if not self.load_or_recompute or not speed:
            return True
        bandwidth = [t.read_bandwidth() for t in self.hierarchy.tiers]
        cost = sum(self.context.groups[k.group].layout.nbytes / bandwidth[loc] for k, loc in zip(keys, locations))
        return cost < num_tokens / speed

    def _blocks_worth_loading(self, locations: list[int]) -> int:
        speed = self.context.prefill_tokens_per_s()
        if not self.load_or_recompute or not speed or not locations:
            return len(locations)
        nbytes = self.context.layout.nbytes
        bandwidth = [t.read_bandwidth() for t in self.hierarchy.tiers]
        costs = [nbytes / bandwidth[loc] for loc in locations]
        return plan_prefix_load(costs, self.context.block_size / speed)

    def on_allocated(self, request: Request, block_ids: tuple[list[int], ...], num_external_tokens: int) -> None:
        keys, locations = self._lookups.pop(request.request_id)
        self._recent.pop(request.request_id, None)
        flat = [b for ids in block_ids for b in ids]
        n = min(len(flat), len(keys))
        self._meta.loads.append(LoadSpec(request.request_id, flat[:n], keys[:n], locations[:n], num_external_tokens))

    def request_blocks_saved(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        if self.write_policy == "write-through" and block_ids:
            self._meta.saves.append(SaveSpec(block_ids, [self.context.key(h, group) for h in block_hashes]))

    def blocks_evicted(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        if self.write_policy == "write-back" and block_ids:
            keys = [self.context.key(h, group) for h in block_hashes]
            self._meta.saves_before_forward.append(SaveSpec(block_ids, keys))

    def build_metadata(self) -> ConnectorMetadata:
        meta, self._meta = self._meta, ConnectorMetadata()
        self._lookups.clear()  # lookups not followed by an allocation this step are stale
        self._remote.new_step()
        return meta

    def on_request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> bool:
        self._remote.forget(request.request_id)  # e.g. aborted while its lookup was due
        self._recent.pop(request.request_id, None)
        return False

    # ---- worker side ---------------------------------------------------------------
    def start_load(self, meta: ConnectorMetadata) -> None:
        # Evicted blocks are copied out first: this step's loads and forward reuse them.
        for spec in meta.saves_before_forward:
            self._store(spec)
        for spec in meta.loads:
            self._loads[spec.request_id] = (self._loader.submit(self._load, spec), len(spec.keys))

    def _load(self, spec: LoadSpec) -> LoadResult:
        if self._mover is not None and self.kv_pools[spec.keys[0].group].is_cuda:
            ok = self._mover.load(self.hierarchy, self.kv_pools, spec.block_ids, spec.keys, spec.sources)
        else:
            into = [self.kv_pools[k.group][b] for b, k in zip(spec.block_ids, spec.keys)]
            ok = self.hierarchy.load(spec.keys, into, spec.sources)
        n_ok = next((i for i, good in enumerate(ok) if not good), len(ok))
        sources: dict[str, int] = {}
        if not self.context.dense:
            # All or nothing (coordinator.loaded_tokens): the tokens count for the slowest tier used.
            if n_ok == len(ok) and ok:
                sources[self.hierarchy.names[max(spec.sources)]] = spec.num_tokens
            return LoadResult(n_ok, len(ok), sources)
        for loc in spec.sources[:n_ok]:
            name = self.hierarchy.names[loc]
            sources[name] = sources.get(name, 0) + self.context.block_size
        return LoadResult(n_ok, len(ok), sources)

    def save(self, meta: ConnectorMetadata) -> None:
        for spec in meta.saves:
            self._store(spec)

    def _store(self, spec: SaveSpec) -> None:
        if not spec.keys:
            return
        pool = self.kv_pools[spec.keys[0].group]  # a save spec covers one group
        if pool.device.type == "cpu":
            blocks = [pool[b] for b in spec.block_ids]  # the hierarchy copies what it keeps
        elif self._mover is not None:
            self._mover.store(self.hierarchy, pool, spec.block_ids, spec.keys)
            return
        else:
            index = torch.tensor(spec.block_ids, device=pool.device)
            blocks = list(pool.index_select(0, index).cpu().unbind(0))
        self.hierarchy.store(spec.keys, blocks)

    def get_finished(self, wait: bool | float = False) -> ConnectorOutput:
        if wait is True:  # the engine has nothing to compute: wait for a load or a lookup to end
            pending = [f for f, _ in self._loads.values()] + self._remote.pending()
            if pending:
                cf.wait(pending, timeout=IDLE_WAIT_S, return_when=cf.FIRST_COMPLETED)
        elif wait and self._loads:  # loads of this step, from fast tiers, may join it
            cf.wait([f for f, _ in self._loads.values()], timeout=float(wait))
        out = ConnectorOutput()
        for rid in [r for r, (f, _) in self._loads.items() if f.done()]:
            future, num_blocks = self._loads.pop(rid)
            try:
                out.finished_loads[rid] = future.result()
            except Exception as e:  # a tier bug must not kill the request: recompute everything
                self.faults.record("load", e)
                self.num_crashed_loads += 1
                out.finished_loads[rid] = LoadResult(0, num_blocks, {})
        return out

    def stats(self) -> dict[str, dict]:
        out = {name: s.as_dict() for name, s in self.hierarchy.stats().items()}
        missed = {n: m for n, m in zip(self.hierarchy.names, self._remote.missed) if m}
        faults = self.faults.counts()
        out["connector"] = {"errors": sum(faults.values()), "faults": faults,
                            "crashed_loads": self.num_crashed_loads,
                            "deferred_lookups": self._remote.deferred, "lookup_timeouts": missed}
        return out

    def flush(self, timeout: float | None = None) -> bool:
        return self.hierarchy.flush(timeout)

    def set_kv_event_bus(self, bus) -> None:
        """Report what every tier stores and removes to `bus` (kvstore/events.py); the
        engine calls this when its first KV-event consumer subscribes."""
        self.hierarchy.set_event_bus(bus, self.context.block_size)

    def close(self) -> None:
        self._remote.close()
        self._loader.shutdown(wait=True)
        self.hierarchy.close()
