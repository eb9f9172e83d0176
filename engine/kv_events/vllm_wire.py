"""vLLM's KV-event wire schema (vllm/distributed/kv_events.py), so a router written for
vLLM can subscribe to kvtier unchanged.

vLLM encodes with msgspec structs declared `array_like` and `tag`ged: a batch is the array
[ts, events, data_parallel_rank?] and each event an array led by its class name:

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]

A batch goes out as three ZMQ frames: topic, an 8-byte big-endian sequence number, the
msgpack payload. Our block hashes are 32-byte sha256 digests (vLLM's ExternalBlockHash
allows bytes); the tier name is the medium. Consecutive stored blocks that chain (each one's
parent is the block before) become one BlockStored, as vLLM sends a request's new blocks.
vLLM's schema has no KV group: a hybrid model's groups share hashes on the wire.
"""
from __future__ import annotations

from collections.abc import Sequence

from kvtier.kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch

NO_LORA = None  # kvtier serves no LoRA adapters


def wire_events(events: Sequence[KVEvent]) -> list[list]:
    """Our per-block events as vLLM event arrays, merging chained stores and adjacent removals."""
    out: list[list] = []
    last_hash: bytes | None = None  # hash of the last block in out[-1], when it is a store
    for e in events:
        prev = out[-1] if out else None
        if isinstance(e, BlockStored):
            tokens = list(e.token_ids) if e.token_ids is not None else []
            if (prev is not None and prev[0] == "BlockStored" and prev[6] == e.medium and prev[4] == e.num_tokens
                    and e.parent_hash is not None and e.parent_hash == last_hash
                    and bool(prev[3]) == bool(tokens)):
                prev[1].append(e.block_hash)
                prev[3].extend(tokens)
            else:
                out.append(["BlockStored", [e.block_hash], e.parent_hash, tokens, e.num_tokens, NO_LORA, e.medium])
            last_hash = e.block_hash
            continue
        last_hash = None
        if isinstance(e, BlockRemoved):
            if prev is not None and prev[0] == "BlockRemoved" and prev[2] == e.medium:
                prev[1].append(e.block_hash)
            else:
                out.append(["BlockRemoved", [e.block_hash], e.medium])
        elif isinstance(e, AllBlocksCleared):
            out.append(["AllBlocksCleared"])
        else:
            raise TypeError(f"not a KV event: {e!r}")
    return out


def encode_batch(batch: KVEventBatch, data_parallel_rank: int | None = None) -> bytes:
    """One batch as vLLM's msgpack payload (a trailing None rank is omitted, as vLLM does)."""
    import msgpack  # the `events` extra; the caller checked it is installed

    body: list = [batch.ts, wire_events(batch.events)]
    if data_parallel_rank is not None:
        body.append(data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)


def decode_batch(payload: bytes) -> tuple[float, list[list], int | None]:
    """(ts, event arrays, data_parallel_rank) of a payload: what a router in Python would do."""
    import msgpack

    body = msgpack.unpackb(payload, raw=False)
    return body[0], body[1], body[2] if len(body) > 2 else None
