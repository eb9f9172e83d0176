"""Chained block hashes for prefix caching.

H_i = sha256(H_{i-1} || token_ids of block i || extra). The root H_{-1} binds the model
fingerprint (weights, dtype, KV layout, block size) and the request's cache_salt, so two
models or two tenants never share a block. Nothing depends on Python's hash seed.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_FORMAT_TAG = b"kvtier-block-hash-v1"


def model_namespace(weights_fingerprint: str, dtype: str, kv_layout: str, block_size: int) -> bytes:
    """Digest that identifies everything that makes one model's KV bytes differ from another's."""
    text = f"{weights_fingerprint}|{dtype}|{kv_layout}|{block_size}"
    return hashlib.sha256(_FORMAT_TAG + text.encode()).digest()


def root_hash(namespace: bytes, cache_salt: str | None) -> bytes:
    salt = b"" if cache_salt is None else b"salt:" + cache_salt.encode()
    return hashlib.sha256(namespace + salt).digest()


def hash_block(parent: bytes, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    # int64 array bytes: unambiguous (fixed width) and much faster than str() joins.
    return hashlib.sha256(parent + array("q", token_ids).tobytes() + extra).digest()


def extend_block_hashes(
    hashes: list[bytes], root: bytes, token_ids: Sequence[int], num_tokens: int, block_size: int
) -> None:
    """Append hashes for every full block of token_ids[:num_tokens] not hashed yet."""
    for i in range(len(hashes), num_tokens // block_size):
        parent = hashes[i - 1] if i else root
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
