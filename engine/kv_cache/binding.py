"""Attach every cache-holding layer of a model to its KV group's device pool.

A layer that keeps state between steps (PagedAttention, the Mamba2 mixer) has a `layer_idx`
and a `bind_cache(pool, group, index_in_group, backend)` method; it finds its own group's
metadata in each step's StepMetadata afterwards.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.engine.kv_cache.specs import KVGroup


def cache_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if callable(getattr(m, "bind_cache", None))]


def bind_kv_caches(model: torch.nn.Module, groups: Sequence[KVGroup], pools: Sequence[torch.Tensor],
                   backend: str) -> None:
    if len(groups) != len(pools):
        raise ValueError(f"{len(groups)} KV groups but {len(pools)} pools")
    where = {layer: (g.index, i) for g in groups for i, layer in enumerate(g.layers)}
    layers = cache_layers(model)
    bound = sorted(m.layer_idx for m in layers)
    if bound != sorted(where):
        raise ValueError(f"model layers with a cache {bound} do not match the KV groups' layers {sorted(where)}")
    for m in layers:
        g, i = where[m.layer_idx]
        m.bind_cache(pools[g], g, i, backend)


def model_groups(model: torch.nn.Module) -> list[KVGroup]:
    """The model's KV groups, from its per-layer specs."""
    from kvtier.engine.kv_cache.specs import group_layers

    return group_layers(list(model.kv_specs()))
