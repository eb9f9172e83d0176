"""`torch` backend (alias `reference`): the per-sequence reference attention, the oracle."""
from __future__ import annotations

import torch

from kvtier.engine.attention.backends.base import AttentionBackend
from kvtier.engine.attention.metadata import build_attention_metadata
from kvtier.engine.attention.paged_attention import reference_attention, write_kv


class TorchBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, seq_specs, block_size, device, window=None, invariant=None):
        # The reference walks sequences one by one: padded decode batches would go unused.
        return build_attention_metadata(seq_specs, block_size, device, batch_decodes=False, window=window,
                                        invariant=invariant)

    def write_kv(self, kv_layer, k, v, meta) -> None:
        write_kv(kv_layer, k, v, meta)

    def attend(self, layer, q, k, v, meta, out: torch.Tensor) -> None:
        reference_attention(q, layer.kv_layer, meta, layer.scale, out)
