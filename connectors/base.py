"""The KV connector interface (docs/architecture.md §4), modelled on vLLM's KVConnectorBase_V1.

A connector moves KV blocks between the engine's device pool and somewhere else. It has two
halves so the worker half could later live in another process:

scheduler side (called by the Scheduler only)
    lookup(request, num_device_tokens) -> tokens loadable beyond the device hit, or None:
        "not known yet, ask again next step" (no side effects on the request; see below)
    on_allocated(request, block_ids, num_external_tokens): block_ids[g] are the device
        blocks of KV group g reserved for the external tokens, in the order
        `context.groups[g].blocks_to_load` gives; the connector records the load
    request_blocks_saved(block_ids, block_hashes, group): blocks of a group that became
        full this step (SSM groups: state checkpoints, keyed by the hash of their prefix)
    blocks_evicted(block_ids, block_hashes, group): cached blocks about to be overwritten
    build_metadata() -> ConnectorMetadata for this step (loads to start, blocks to save)
    on_request_finished(request, block_ids) -> True to hold the blocks until a save completes
worker side (called around the forward pass)
    register_kv_caches(pools) (one pool per KV group), start_load(meta) (before the
    forward), save(meta) (after the forward), get_finished() -> ConnectorOutput

KV groups (connectors/groups.py): a dense model has one full-attention group; hybrid models
add sliding-window and SSM-state groups. A lookup must answer for all groups: tokens L
beyond the device hit L0 count only if every group can resume at L (for each group,
`blocks_to_load(L0, L)` names the blocks it needs). Keys carry the group
(`context.key(hash, group)`).

lookup runs on the engine loop, so it must answer in microseconds: a connector asking a
remote store does so off the loop and returns None until the answer is in. The scheduler
then passes over that request for this step (it keeps its place in the queue) and keeps
running and admitting the others. A connector must settle within a bounded time (the
tiered connector's `lookup_budget_s`), answering from what it knows if a store is silent.

Loads are asynchronous: a request whose prefix is being loaded waits in WAITING_FOR_KV
while other requests keep running. A failed block truncates the reused prefix to the
blocks before it; the engine recomputes the rest. A request never runs on wrong KV.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvtier.connectors.groups import GroupInfo
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.spec import BlockLayout


class Request(Protocol):
    """What a connector may read of an engine request (the engine's Request has these)."""

    request_id: str
    block_hashes: Sequence[bytes]  # chained hashes of its full blocks; they already bind
    # the model fingerprint and the request's cache_salt
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...


@dataclass(frozen=True)
class ConnectorContext:
    """What a connector learns about the engine when it is built."""

    namespace: bytes  # model namespace digest (engine/kv_cache/block_hash.model_namespace)
    layout: BlockLayout  # group 0's stored block, e.g. [num_layers, 2, block_size, kv_heads, head_dim]
    block_size: int
    # Measured prefill speed (tokens/s), or None before the engine has measured it.
    prefill_tokens_per_s: Callable[[], float | None] = lambda: None
    # The engine's KV groups; default: one full-attention group of `layout`.
    groups: tuple[GroupInfo, ...] = ()

    def __post_init__(self):
        if not self.groups:
            object.__setattr__(self, "groups", (GroupInfo("full", self.layout),))

    @property
    def dense(self) -> bool:
        """One full-attention group: every block of a prefix is needed, in order."""
        return len(self.groups) == 1 and self.groups[0].kind == "full"

    def key(self, block_hash: bytes, group: int = 0) -> BlockKey:
        return BlockKey(self.namespace, block_hash, group)


@dataclass
class LoadSpec:
    request_id: str
    block_ids: list[int]  # device blocks to fill, each in the pool of its key's group
    keys: list[BlockKey]
    sources: list[int] = field(default_factory=list)  # connector-private: where each block lives
    num_tokens: int = 0  # tokens the load covers (hybrid loads: all or nothing)


@dataclass
class SaveSpec:
    block_ids: list[int]  # in the pool of each key's group
    keys: list[BlockKey]


@dataclass
class ConnectorMetadata:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)  # after the forward: freshly computed blocks
    # Before the forward: cached blocks about to be overwritten (write-back policy).
    saves_before_forward: list[SaveSpec] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.loads or self.saves or self.saves_before_forward)


@dataclass
class LoadResult:
    num_blocks_ok: int  # leading blocks loaded intact; the rest must be recomputed
    num_blocks: int
    # Where the loaded blocks came from, e.g. {"cpu": 12, "lmdb": 3} (in tokens).
    sources: dict[str, int] = field(default_factory=dict)


@dataclass
class ConnectorOutput:
    finished_loads: dict[str, LoadResult] = field(default_factory=dict)
    finished_saves: set[str] = field(default_factory=set)  # request ids whose held blocks are saved


class KVConnector:
    """Base class with no-op defaults: a connector overrides what it supports."""

    def __init__(self, config: dict, context: ConnectorContext):
        self.config = dict(config or {})
        self.context = context

    # ---- scheduler side ------------------------------------------------------------
    def lookup(self, request: Request, num_device_tokens: int) -> int | None:
        """Tokens beyond the device hit this connector can load, or None while unknown."""
        return 0

    def on_allocated(self, request: Request, block_ids: tuple[list[int], ...], num_external_tokens: int) -> None:
        pass

    def request_blocks_saved(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        """Blocks of one KV group computed this step that became full; saved after the forward."""

    def blocks_evicted(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        """Cached device blocks of one KV group about to be reused this step (before the forward)."""

    def build_metadata(self) -> ConnectorMetadata:
        return ConnectorMetadata()

    def on_request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> bool:
        return False

    # ---- worker side ---------------------------------------------------------------
    def register_kv_caches(self, kv_pools: Sequence[torch.Tensor]) -> None:
        """One device pool per KV group; `kv_pools[g][block_id]` is one stored block (a
        single tensor is taken as the one pool of a dense model)."""
        self.kv_pools = [kv_pools] if isinstance(kv_pools, torch.Tensor) else list(kv_pools)
        self.kv_pool = self.kv_pools[0]

    def start_load(self, meta: ConnectorMetadata) -> None:
        pass

    def save(self, meta: ConnectorMetadata) -> None:
        pass

    def get_finished(self, wait: bool | float = False) -> ConnectorOutput:
        """Completed loads/saves. wait=True (the engine has nothing to compute): first wait,
        briefly (the loop steps again soon after), for a pending load or lookup to end.
        wait=<seconds>: wait at most that long for loads started this step, so loads from
        fast tiers join the step that started them (the engine asks with a few ms)."""
        return ConnectorOutput()

    def stats(self) -> dict[str, dict]:
        return {}

    def close(self) -> None:
        pass
