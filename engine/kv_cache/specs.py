"""What each layer keeps between steps (its KV spec), and the KV groups those specs form.

A model declares one spec per layer (`model.kv_specs()`):
- FullAttentionSpec: K and V of every token, in paged blocks.
- SlidingWindowSpec: the same, but a token only sees the `window` newest keys (itself
  included), so blocks that left the window can be freed.
- MambaSpec: a fixed-size recurrent state per sequence (conv state + SSM state), whatever
  the length; prefix reuse goes through state checkpoints at block boundaries.

Layers with equal specs form a KV group; each group has its own device pool, block tables
and manager (engine/kv_cache/coordinator.py). A dense model is exactly one group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FullAttentionSpec:
    num_kv_heads: int
    head_dim: int

    kind = "full"

    def block_shape(self, num_layers: int, block_size: int) -> tuple[int, ...]:
        """One block of the group's page-first pool: every layer's K and V of block_size tokens."""
        return (num_layers, 2, block_size, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class SlidingWindowSpec:
    num_kv_heads: int
    head_dim: int
    window: int  # a query sees keys at positions > its own - window

    kind = "sliding"

    def block_shape(self, num_layers: int, block_size: int) -> tuple[int, ...]:
        return (num_layers, 2, block_size, self.num_kv_heads, self.head_dim)

    def first_needed_block(self, next_position: int, block_size: int) -> int:
        """First block a query at `next_position` (or later) still reads."""
        return max(0, next_position - self.window + 1) // block_size


@dataclass(frozen=True)
class MambaSpec:
    """Per layer: conv state (the last d_conv - 1 inputs of the causal conv) and SSM state."""

    conv_shape: tuple[int, ...]  # (conv_dim, d_conv - 1)
    ssm_shape: tuple[int, ...]  # (num_heads, head_dim, d_state)

    kind = "ssm"

    @property
    def conv_numel(self) -> int:
        return math.prod(self.conv_shape)

    @property
    def numel(self) -> int:
        return self.conv_numel + math.prod(self.ssm_shape)

    def block_shape(self, num_layers: int, block_size: int) -> tuple[int, ...]:
        """One state slot: every layer's conv and SSM state, flattened, in one contiguous run."""
        return (num_layers, self.numel)


LayerKVSpec = FullAttentionSpec | SlidingWindowSpec | MambaSpec


@dataclass(frozen=True)
class KVGroup:
    index: int
    spec: LayerKVSpec
    layers: tuple[int, ...]  # model layer indices, ascending; position in this tuple = index in the pool

    @property
    def kind(self) -> str:
        return self.spec.kind

    def block_shape(self, block_size: int) -> tuple[int, ...]:
        return self.spec.block_shape(len(self.layers), block_size)


def group_layers(specs: list[LayerKVSpec]) -> list[KVGroup]:
    """Layers with equal specs form a group; groups are numbered by their first layer."""
    order: dict[LayerKVSpec, list[int]] = {}
    for layer, spec in enumerate(specs):
        if not isinstance(spec, (FullAttentionSpec, SlidingWindowSpec, MambaSpec)):
            raise ValueError(f"layer {layer}: unknown KV spec {spec!r}")
        order.setdefault(spec, []).append(layer)
    if not order:
        raise ValueError("the model declares no layers with a KV cache")
    return [KVGroup(i, spec, tuple(layers)) for i, (spec, layers) in enumerate(order.items())]
