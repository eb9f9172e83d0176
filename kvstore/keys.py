"""Block keys: which model/tenant namespace, which chained prefix hash, which KV group.

The chained hash already folds in the model fingerprint and cache_salt (engine/kv_cache/block_hash.py),
so two models or tenants never produce the same key; the namespace prefix additionally
lets a store list, count or drop one model's blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

NAMESPACE_BYTES = 8  # prefix of the model namespace digest kept in every key


@dataclass(frozen=True)
class BlockKey:
    namespace: bytes  # model namespace digest (weights, dtype, layout, block size)
    block_hash: bytes  # chained sha256 of the prefix up to and including this block
    group: int = 0  # KV-cache group (0 for dense models)

    def __post_init__(self) -> None:
        if len(self.block_hash) != 32:
            raise ValueError(f"block_hash: expected 32 bytes, got {len(self.block_hash)}")
        if not 0 <= self.group < 256:
            raise ValueError(f"group: must be in [0, 256), got {self.group}")

    def to_bytes(self) -> bytes:
        """Fixed 41-byte binary form used as the key in every store."""
        return self.namespace[:NAMESPACE_BYTES].ljust(NAMESPACE_BYTES, b"\0") + self.block_hash + bytes([self.group])

    def hex(self) -> str:
        return self.to_bytes().hex()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "BlockKey":
        if len(raw) != NAMESPACE_BYTES + 33:
            raise ValueError(f"block key: expected {NAMESPACE_BYTES + 33} bytes, got {len(raw)}")
        return cls(raw[:NAMESPACE_BYTES], raw[NAMESPACE_BYTES:-1], raw[-1])
