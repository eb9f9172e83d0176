"""Integrity for plugin authors: wrap a block in kvtier's self-describing stored value and
check it on the way back (docs/connectors.md, "Integrity").

A connector that keeps blocks in its own store is responsible for never loading bad bytes
into the device pool. `seal_block` turns one block (a tensor from `kv_pools[g][b]`) into
bytes with the same header and checksum the built-in tiers write (kvstore/format/codec.py:
magic, version, dtype, shape, a digest of the key, xxh3 checksum over header and payload).
`unseal_block` checks those bytes against the key they are read for and returns the block,
or raises CorruptBlock (a ValueError) for a flipped byte, a truncated value, a value stored
under another key or another block shape; `unseal_block_or_none` returns None instead.
A connector that gets None (or the exception) reports the load as failed from that block
on (LoadResult.num_blocks_ok), and the engine recomputes the rest.
"""
from __future__ import annotations

import torch

from kvtier.kvstore.format.codec import CorruptBlock, decode_block, encode_block
from kvtier.kvstore.keys import BlockKey

__all__ = ["CorruptBlock", "seal_block", "unseal_block", "unseal_block_or_none"]


def seal_block(key: BlockKey, block: torch.Tensor) -> bytes:
    """The block's bytes behind a header and checksum bound to `key` (a copy: safe to keep)."""
    return encode_block(key, block)


def unseal_block(value: bytes | memoryview, key: BlockKey, into: torch.Tensor | None = None) -> torch.Tensor:
    """The block stored in `value` for `key`, copied into `into` when given (it must have the
    stored dtype and shape). Raises CorruptBlock when the value is damaged or belongs elsewhere."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CorruptBlock(f"expected the bytes of a sealed block, got {type(value).__name__}")
    block = decode_block(value, key)
    if into is None:
        return block.clone()  # decode_block may view `value`; the caller gets its own copy
    if tuple(into.shape) != tuple(block.shape) or into.dtype != block.dtype:
        raise CorruptBlock(f"stored block {block.dtype}{list(block.shape)} does not fit the destination "
                           f"{into.dtype}{list(into.shape)}")
    into.copy_(block)
    return into


def unseal_block_or_none(value: bytes | memoryview | None, key: BlockKey,
                         into: torch.Tensor | None = None) -> torch.Tensor | None:
    """unseal_block, but None for a missing or corrupt value (for a load loop that stops at
    the first bad block)."""
    if value is None:
        return None
    try:
        return unseal_block(value, key, into)
    except CorruptBlock:
        return None
