"""Attention backends: how a layer writes its step's K/V into the pool and attends over it.

Each backend pairs a metadata builder (what per-step tensors it needs, built once per KV
group per step by the model runner) with the layer-side call that reads them:

- `torch`: the per-sequence reference (`reference_attention`), float32 softmax; the oracle.
  The old name `reference` is an alias.
- `sdpa`: torch's scaled_dot_product_attention, decodes in padded batches.
- `triton`: the kernels of `kvtier.engine.kernels` (one launch per layer for the whole step,
  straight from the page-first pool). Needs CUDA, or TRITON_INTERPRET=1 to run interpreted
  on CPU tensors (how the tests check it).
- `auto`: triton on a CUDA device where triton runs, sdpa otherwise.

Deterministic sequences are served by attention/invariant_attention.py whatever the backend.
"""
from __future__ import annotations

import torch

from kvtier.engine.attention.backends.base import AttentionBackend
from kvtier.engine.kernels import triton_available

BACKENDS = ("torch", "sdpa", "triton")
ALIASES = {"reference": "torch"}
CHOICES = ("auto", *BACKENDS, *ALIASES)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend `name` means on `device`: `auto` decided, aliases mapped. ValueError for an
    unknown name, or for `triton` where its kernels cannot run."""
    if not isinstance(name, str):
        raise ValueError(f"attention_backend: must be a name ({', '.join(CHOICES)}), got {name!r}")
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "sdpa"
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown {name!r}; use one of {', '.join(CHOICES)}")
    if name == "triton" and not triton_available(device):
        raise ValueError(
            f"attention_backend: triton cannot run on {device}: it needs triton installed and a CUDA "
            "device (or TRITON_INTERPRET=1 to interpret the kernels on the CPU, for tests)")
    return name


def get_backend(name: str) -> AttentionBackend:
    """A backend object by (canonical or alias) name. Imports triton only for `triton`."""
    name = ALIASES.get(name, name)
    if name == "torch":
        from kvtier.engine.attention.backends.torch_backend import TorchBackend

        return TorchBackend()
    if name == "sdpa":
        from kvtier.engine.attention.backends.sdpa_backend import SdpaBackend

        return SdpaBackend()
    if name == "triton":
        from kvtier.engine.attention.backends.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"attention backend: unknown {name!r}; use one of {', '.join(BACKENDS)}")


__all__ = ["ALIASES", "BACKENDS", "CHOICES", "AttentionBackend", "get_backend", "resolve_backend"]
