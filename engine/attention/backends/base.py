"""The interface every attention backend implements (see the package docstring)."""
from __future__ import annotations

import torch


class AttentionBackend:
    """Stateless: one object per layer is fine. A backend's metadata is whatever its
    `build_metadata` returns; it must carry `invariant_seqs`, `invariant_plan`, `block_size`
    and `window`, which the deterministic path (attention/invariant_attention.py) reads."""

    name = ""

    def build_metadata(self, seq_specs: list[tuple[int, int, list[int]]], block_size: int,
                       device: torch.device, window: int | None = None,
                       invariant: list[bool] | None = None):
        """Once per step per attention group. seq_specs: (num_computed_before, num_new_tokens,
        block_ids) per sequence in batch order, as `build_attention_metadata` takes them."""
        raise NotImplementedError

    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> None:
        """This step's new K/V rows into their slots of one layer's pool view."""
        raise NotImplementedError

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta, out: torch.Tensor) -> None:
        """Fill `out` for every sequence that is not deterministic (`layer` is the bound
        PagedAttention: its pool, pool view, index in the group, scale). Rows of deterministic
        sequences may be left anything: the invariant path overwrites them afterwards."""
        raise NotImplementedError
