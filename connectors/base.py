"""The KV connector interface (the contract in full: docs/connectors.md), modelled on
vLLM's KVConnectorBase_V1.

A connector moves KV blocks between the engine's device pool and a store of its own. It has
two halves so the worker half could later live in another process; today both are one
object, and the engine calls every method from its loop thread, one call at a time.

scheduler half (must not block: the loop also decodes every running request)
    lookup(request, num_device_tokens) -> tokens loadable beyond the device hit, 0, or None
        ("not known yet": asked again next step; the request keeps its place)
    on_allocated(request, block_ids, num_external_tokens): blocks reserved for a load
    request_blocks_saved(block_ids, block_hashes, group): blocks this step's forward fills
    blocks_evicted(block_ids, block_hashes, group): cached blocks handed out again this step
    build_metadata() -> ConnectorMetadata: the step's loads and saves (the one channel
        between the halves; extra fields go in a ConnectorMetadata subclass)
    on_request_finished(request, block_ids) -> True to hold the blocks until a save ends
worker half
    register_kv_caches(pools) (one pool per KV group), start_load(meta) (before the
    forward), save(meta) (after it), get_finished(wait) -> ConnectorOutput

The engine guards every call (connectors/guard.py): an exception or a timed-out load
(kv_load_timeout_s) costs a recompute, never a request or a device block.

KV groups (connectors/groups.py): a dense model has one full-attention group; hybrid models
add sliding-window and SSM-state groups. A lookup must answer for all groups: tokens L
beyond the device hit L0 count only if every group can resume at L (for each group,
`blocks_to_load(L0, L)` names the blocks it needs). Keys carry the group
(`context.key(hash, group)`); block hashes already bind the model and the cache_salt.

A failed block truncates the reused prefix to the blocks before it (a hybrid load is all or
nothing); the engine recomputes the rest. Integrity of stored bytes is the connector's job
(connectors/integrity.py seals and checks a block).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvtier.connectors.device_copy import BlockCopy
from kvtier.connectors.groups import GroupInfo
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.spec import BlockLayout


class Request(Protocol):
    """What a connector may read (never change) of an engine request."""

    request_id: str  # unique across engine instances
    block_hashes: Sequence[bytes]  # chained hashes of its full blocks; they already bind
    # the model fingerprint and the request's cache_salt
    num_computed_tokens: int  # tokens with KV on the device (in on_allocated: the load's start)

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
    # Whole-block copies between a device pool and pinned staging (connectors/device_copy.py),
    # given by the engine where a kernel for the pools' device exists; None: plain torch copies.
    block_copy: BlockCopy | None = None

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
    """One request's load: fill block_ids[j] (in the pool of keys[j].group) with keys[j]."""

    request_id: str
    block_ids: list[int]  # device blocks to fill, each in the pool of its key's group
    keys: list[BlockKey]
    sources: list[int] = field(default_factory=list)  # connector-private: where each block lives
    num_tokens: int = 0  # tokens the load covers (hybrid loads: all or nothing)


@dataclass
class SaveSpec:
    """Blocks to copy out: block_ids[j] of the pool of keys[j].group, stored as keys[j]."""

    block_ids: list[int]  # in the pool of each key's group
    keys: list[BlockKey]


@dataclass
class ConnectorMetadata:
    """What one step's worker half must do (build_metadata hands it over)."""

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
    # Where the loaded tokens came from, e.g. {"cpu": 192, "lmdb": 48}; empty: all are
    # credited to the connector's name (KVConnector.name, else the name it was configured by).
    sources: dict[str, int] = field(default_factory=dict)


@dataclass
class ConnectorOutput:
    finished_loads: dict[str, LoadResult] = field(default_factory=dict)
    finished_saves: set[str] = field(default_factory=set)  # request ids whose held blocks are saved


class KVConnector:
    """Base class with no-op defaults: a connector overrides what it supports."""

    name: str | None = None  # kv_sources label for loads that name no source

    def __init__(self, config: dict, context: ConnectorContext):
        self.config = dict(config or {})
        self.context = context

    # ---- scheduler side ------------------------------------------------------------
    def lookup(self, request: Request, num_device_tokens: int) -> int | None:
        """Tokens beyond the device hit this connector can load (whole blocks, short of the
        block holding the last token), or None while unknown. No side effects; may be asked
        again each step until the request is admitted."""
        return 0

    def on_allocated(self, request: Request, block_ids: tuple[list[int], ...], num_external_tokens: int) -> None:
        """Blocks reserved for a load, one list per group in `groups[g].blocks_to_load(
        request.num_computed_tokens, + num_external_tokens)` order; the connector's to fill
        until the load is reported by get_finished (or times out)."""

    def request_blocks_saved(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        """Blocks of one KV group computed this step that became full; saved after the forward."""

    def blocks_evicted(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        """Cached device blocks of one KV group about to be reused this step (before the forward)."""

    def build_metadata(self) -> ConnectorMetadata:
        """Everything recorded since the last call, for start_load and save."""
        return ConnectorMetadata()

    def on_request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> bool:
        """A request ended (after its last step's save). True keeps its blocks until its id
        appears in ConnectorOutput.finished_saves (a save still running on your thread)."""
        return False

    # ---- worker side ---------------------------------------------------------------
    def register_kv_caches(self, kv_pools: Sequence[torch.Tensor]) -> None:
        """One device pool per KV group; `kv_pools[g][block_id]` is one stored block (a
        single tensor is taken as the one pool of a dense model)."""
        self.kv_pools = [kv_pools] if isinstance(kv_pools, torch.Tensor) else list(kv_pools)
        self.kv_pool = self.kv_pools[0]

    def start_load(self, meta: ConnectorMetadata) -> None:
        """Before the forward: copy out meta.saves_before_forward, then start meta.loads."""

    def save(self, meta: ConnectorMetadata) -> None:
        """After the forward: copy out meta.saves now (the pool is reused afterwards)."""

    def get_finished(self, wait: bool | float = False) -> ConnectorOutput:
        """Completed loads (each reported once) and held saves. wait=True (the engine has
        nothing to compute): first wait, briefly (tens of ms), for a pending load or lookup to end.
        wait=<seconds>: wait at most that long for loads started this step, so loads from
        fast tiers join the step that started them (the engine asks with a few ms)."""
        return ConnectorOutput()

    def stats(self) -> dict[str, dict]:
        return {}

    def close(self) -> None:
        pass
