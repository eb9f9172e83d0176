"""Base class for tiers that store encoded values in a byte store (LMDB, Redis, gRPC).

Subclasses implement four raw batch operations on `bytes` keys; this class encodes blocks
with the tier's codec, verifies every value it reads (a corrupt value is a miss, is deleted
and is counted), and keeps the stats. Store faults never escape as exceptions: each is
counted and logged, rate-limited per kind (Tier._fault).
"""
from __future__ import annotations

import abc
import time
from collections.abc import Iterable, Sequence

import torch

from kvtier.kvstore.format.codec import Codec, CorruptBlock, decode_into, encode_parts, get_codec, key_digest
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.base import Tier


class StoreUnavailable(Exception):
    """Raised by the raw operations when the backing store cannot be reached."""


class ByteStoreTier(Tier):
    def __init__(self, capacity_bytes: int, codec: str = "raw"):
        super().__init__(capacity_bytes)
        self.codec: Codec = get_codec(codec)

    # --- what a byte store implements -------------------------------------------------
    @abc.abstractmethod
    def _exists(self, keys: list[bytes]) -> list[bool]:
        """Presence of each key, in one round trip."""

    @abc.abstractmethod
    def _read(self, keys: list[bytes]) -> list[bytes | memoryview | None]:
        """Values (None where absent), in one round trip per store."""

    @abc.abstractmethod
    def _write(self, keys: list[bytes], values: list[bytes]) -> None:
        """Store values (one round trip / one transaction)."""

    @abc.abstractmethod
    def _remove(self, keys: list[bytes]) -> None:
        """Delete keys."""

    def _read_into(self, raw_keys: list[bytes], keys: Sequence[BlockKey], into: Sequence[torch.Tensor]):
        """Read and decode into the tensors: (ok flags, positions of corrupt values, bytes
        read). Stores that can receive a payload straight into its tensor override this."""
        return decode_values(self._read(raw_keys), keys, into)

    def _write_parts(self, keys: list[bytes], parts: Iterable[tuple[bytes, memoryview]]) -> None:
        """Store values given as (header, payload) pairs, produced lazily as they are
        encoded; payloads may be views of the caller's blocks, valid only during the call.
        Stores that can send both pieces back to back override this to skip joining them."""
        self._write(keys, [b"".join(p) for p in parts])

    # --- the Tier interface -----------------------------------------------------------
    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        try:
            return self._exists([k.to_bytes() for k in keys])
        except StoreUnavailable as e:
            self._fault("contains", e)
            return [False] * len(keys)

    def lookup_prefix(self, keys: Sequence[BlockKey]) -> int:
        n = 0
        for present in self.contains(keys):
            if not present:
                break
            n += 1
        return n

    def get(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]) -> list[bool]:
        start = time.perf_counter()
        raw_keys = [k.to_bytes() for k in keys]
        try:
            ok, corrupt, nbytes = self._read_into(raw_keys, keys, into)
        except StoreUnavailable as e:
            self._fault("get", e, misses=len(keys))
            return [False] * len(keys)
        if corrupt:
            self._drop([raw_keys[i] for i in corrupt])
        hits = sum(ok)
        self._stats.add(
            hits=hits,
            misses=len(keys) - hits,
            errors=len(corrupt),
            bytes_read=nbytes,
            read_seconds=time.perf_counter() - start,
        )
        return ok

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        if not keys:
            return
        start = time.perf_counter()
        nbytes = 0
        sizes: list[int] | None = [] if self._events is not None and self._events.active else None

        def encoded():
            nonlocal nbytes
            for k, b in zip(keys, blocks):
                head, payload = encode_parts(k, b, self.codec)
                nbytes += len(head) + len(payload)
                if sizes is not None:
                    sizes.append(len(head) + len(payload))
                yield head, payload

        try:
            self._write_parts([k.to_bytes() for k in keys], encoded())
        except StoreUnavailable as e:
            self._fault("put", e, skipped_writes=len(keys))
            return
        self._stats.add(puts=len(keys), bytes_written=nbytes, write_seconds=time.perf_counter() - start)
        if sizes is not None:
            self._events.stored(keys, sizes)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        self._drop([k.to_bytes() for k in keys])

    def _drop(self, raw_keys: list[bytes]) -> None:
        try:
            self._remove(raw_keys)
        except StoreUnavailable as e:
            self._fault("delete", e)
            return
        if self._events is not None:  # keys that were absent are harmless to report
            self._events.removed([BlockKey.from_bytes(k) for k in raw_keys], "deleted")


def decode_values(values: Sequence, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]
                  ) -> tuple[list[bool], list[int], int]:
    """Verify and decode each value (None: absent) into its tensor: (ok flags, positions of
    corrupt values, bytes decoded)."""
    ok: list[bool] = []
    corrupt: list[int] = []
    nbytes = 0
    for i, (key, value, dst) in enumerate(zip(keys, values, into)):
        if value is None:
            ok.append(False)
            continue
        try:
            nbytes += decode_into(value, key_digest(key), dst)
            ok.append(True)
        except CorruptBlock:
            corrupt.append(i)
            ok.append(False)
    return ok, corrupt, nbytes
