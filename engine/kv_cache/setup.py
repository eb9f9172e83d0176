"""Build an engine's KV cache from its model and config: groups, pools, binding, coordinator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.connectors.groups import GroupInfo
from kvtier.engine.attention.backends import resolve_backend
from kvtier.engine.kv_cache.binding import bind_kv_caches, model_groups
from kvtier.engine.kv_cache.budget import default_checkpoint_interval, split_kv_budget
from kvtier.engine.kv_cache.coordinator import KVCacheCoordinator
from kvtier.engine.kv_cache.specs import KVGroup
from kvtier.kvstore.tiers.spec import BlockLayout


@dataclass
class KVCache:
    groups: list[KVGroup]
    pools: list[torch.Tensor]  # one page-first pool per group (docs/architecture.md §3)
    infos: list[GroupInfo]  # what connectors learn about each group
    coordinator: KVCacheCoordinator
    attention_backend: str = "sdpa"  # resolved name (attention/backends/): what the runner builds metadata for


def build_kv_cache(model: torch.nn.Module, config, max_model_len: int) -> KVCache:
    """config: an EngineConfig. Splits the device budget between the model's KV groups,
    allocates their pools and binds every cache-holding layer to its group's pool."""
    bs = config.block_size
    groups = model_groups(model)
    num_blocks = split_kv_budget(groups, config.kv_pool_bytes(), bs, config.dtype, config.max_num_seqs,
                                 max_model_len, config.max_num_batched_tokens, config.kv_group_memory_fractions)
    pools = [torch.zeros((n, *g.block_shape(bs)), dtype=config.dtype, device=config.device)
             for g, n in zip(groups, num_blocks)]
    backend = resolve_backend(config.attention_backend, config.device)
    bind_kv_caches(model, groups, pools, backend)
    infos = [GroupInfo(g.kind, BlockLayout(g.block_shape(bs), config.dtype, config.device),
                       g.spec.window if g.kind == "sliding" else None) for g in groups]
    every_checkpoint = config.ssm_checkpoint_policy == "auto"
    interval = (config.ssm_checkpoint_interval or default_checkpoint_interval(groups, bs, config.dtype)
                if every_checkpoint else 0)
    coordinator = KVCacheCoordinator(groups, infos, num_blocks, bs, config.enable_prefix_caching,
                                     config.max_num_batched_tokens, interval,
                                     track_transfers=config.connector_spec() is not None,
                                     ssm_branch_points=every_checkpoint)
    return KVCache(groups, pools, infos, coordinator, backend)
