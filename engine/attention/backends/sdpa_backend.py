"""`sdpa` backend: torch's scaled_dot_product_attention (the fastest verified CPU path)."""
from __future__ import annotations

import torch

from kvtier.engine.attention.backends.base import AttentionBackend
from kvtier.engine.attention.metadata import build_attention_metadata
from kvtier.engine.attention.paged_attention import sdpa_attention, write_kv


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def build_metadata(self, seq_specs, block_size, device, window=None, invariant=None):
        return build_attention_metadata(seq_specs, block_size, device, window=window, invariant=invariant)

    def write_kv(self, kv_layer, k, v, meta) -> None:
        write_kv(kv_layer, k, v, meta)

    def attend(self, layer, q, k, v, meta, out: torch.Tensor) -> None:
        sdpa_attention(q, k, v, layer.kv_pool, layer.index_in_group, meta, layer.scale, out)
