"""Deterministic (batch-invariant) mode: what `deterministic=True` switches on (docs/determinism.md).

- The model: every Linear and the LM head go through one `InvariantMatmul`, silu and
  softplus use their exact forms, attention serves deterministic sequences with
  `invariant_attention`, and Mamba2 prefills of deterministic sequences run the decode
  recurrence token by token.
- Requests: a deterministic request's prefix hashes get their own root, so it never reuses
  KV an ordinary request computed with the fast kernels (and vice versa); an unseeded
  sampled request gets a seed derived from the engine seed and its prompt, so sampling
  never depends on which other requests drew from a shared generator first.
- Tiers must store KV bytes unchanged: a lossy codec would make a reload differ from a
  recompute.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import torch

from kvtier.engine.attention.invariant_attention import chunk_keys_for
from kvtier.engine.attention.paged_attention import PagedAttention
from kvtier.engine.layers.activation import SiluAndMul
from kvtier.engine.layers.batch_invariant import InvariantMatmul
from kvtier.engine.layers.embedding import LMHead
from kvtier.engine.layers.linear import Linear
from kvtier.engine.layers.mamba2 import GatedRMSNorm, Mamba2Mixer

DETERMINISTIC_SALT = "kvtier:deterministic"
_LOSSLESS_CODECS = ("raw",)


def enable_batch_invariance(model: torch.nn.Module, block_size: int) -> InvariantMatmul:
    """Switch every layer of `model` to its batch-invariant form; returns the shared matmul
    (its `strategies` show what each shape was verified to run as)."""
    matmul = InvariantMatmul()
    chunk = chunk_keys_for(block_size)
    for module in model.modules():
        if isinstance(module, (Linear, LMHead)):
            module.invariant = matmul
        elif isinstance(module, PagedAttention):
            module.invariant, module.chunk_keys = matmul, chunk
        elif isinstance(module, (SiluAndMul, GatedRMSNorm, Mamba2Mixer)):
            module.exact = True
    return matmul


def check_tier_codecs(tier_specs: Sequence[str]) -> None:
    """ValueError for a tier that would store KV lossily (deterministic mode needs raw bytes)."""
    from kvtier.kvstore.tiers.spec import parse_tier_spec

    for text in tier_specs:
        codec = parse_tier_spec(text).option("codec", "raw")
        if codec not in _LOSSLESS_CODECS:
            raise ValueError(f"kv_tiers: {text!r} uses codec {codec!r}, which changes KV bits; deterministic mode "
                             f"needs codec=raw so a reload equals a recompute")


def cache_salt_for(cache_salt: str | None, deterministic: bool) -> str | None:
    """The salt a request's prefix hashes use: deterministic requests get their own."""
    if not deterministic:
        return cache_salt
    return DETERMINISTIC_SALT if cache_salt is None else f"{DETERMINISTIC_SALT}:{cache_salt}"


def derived_seed(engine_seed: int, prompt_token_ids: Sequence[int]) -> int:
    """A seed for an unseeded sampled request: the same prompt samples the same way in any batch."""
    digest = hashlib.sha256(array("q", [engine_seed, *prompt_token_ids]).tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
