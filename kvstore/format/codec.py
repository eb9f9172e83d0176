"""Self-describing stored block values: a fixed header, then the codec's payload.

    magic "KVTB" | version | codec id | dtype id | ndim | shape (8 x u32) |
    key digest (16 B) | payload length (u64) | checksum (u64)

The checksum is xxh3-64 of the payload, seeded with xxh3-64 of the header up to the
checksum field: it covers both, so a flipped byte anywhere, a value stored under another
key, or a truncated value is rejected (two one-shot hashes: no hasher object per block). One
value per block means no multi-key races and nothing to keep in step.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import struct
import warnings
from collections.abc import Callable

import numpy as np
import torch
import xxhash

from kvtier.kvstore.keys import BlockKey

# Decoded payloads are read-only views that callers copy at once; torch's warning about
# non-writable buffers is noise for that pattern.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

MAGIC = b"KVTB"
VERSION = 2  # 2: header-seeded payload checksum
_MAX_DIMS = 8
_HEAD = struct.Struct("<4sBBBB8I16sQ")  # everything before the checksum
_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = _HEAD.size + _CHECKSUM.size

DTYPE_IDS = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float8_e4m3fn: 4, torch.uint8: 5}
_DTYPES = {v: k for k, v in DTYPE_IDS.items()}
_NUMPY_NATIVE = (torch.float32, torch.float16, torch.uint8)


class CorruptBlock(ValueError):
    """A stored value that fails its header or checksum check."""


class Codec:
    """Turns one block tensor into payload bytes and back. Subclasses register by id."""

    name = "raw"
    codec_id = 0

    def encode(self, block: torch.Tensor) -> bytes | memoryview:
        return _tensor_bytes(block)

    def decode(self, payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        expected = torch.Size(shape).numel() * dtype.itemsize
        if len(payload) != expected:
            raise CorruptBlock(f"raw payload has {len(payload)} bytes, expected {expected}")
        return torch.frombuffer(payload, dtype=dtype).view(shape)


_CODECS: dict[str, Callable[[], Codec]] = {"raw": Codec}
_CODECS_BY_ID: dict[int, Codec] = {0: Codec()}


# Built-in codecs that register themselves when their module is first imported: a reader
# (any tier, the kv-server) must decode values whatever codec their writer chose.
_BUILTIN_MODULES = {"fp8": "kvtier.kvstore.format.fp8"}
_BUILTIN_IDS = {1: "fp8"}


def register_codec(factory: Callable[[], Codec]) -> None:
    codec = factory()
    _CODECS[codec.name] = factory
    _CODECS_BY_ID[codec.codec_id] = codec


def get_codec(name: str) -> Codec:
    if name not in _CODECS and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    try:
        return _CODECS[name]()
    except KeyError:
        raise ValueError(f"codec: unknown {name!r}; known: {', '.join(sorted({*_CODECS, *_BUILTIN_MODULES}))}")


def _codec_by_id(codec_id: int) -> Codec | None:
    if codec_id not in _CODECS_BY_ID and codec_id in _BUILTIN_IDS:
        get_codec(_BUILTIN_IDS[codec_id])
    return _CODECS_BY_ID.get(codec_id)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes; a view, not a copy, for a contiguous CPU tensor (the usual case,
    kept to two cheap calls because stores encode dozens of blocks per batch)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad:
        t = t.detach().contiguous().cpu()
    if t.dtype in _NUMPY_NATIVE:
        return memoryview(t.numpy()).cast("B")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")  # bf16 / fp8: no numpy dtype


def key_digest(key: BlockKey) -> bytes:
    return hashlib.blake2b(key.to_bytes(), digest_size=16).digest()


@functools.lru_cache(maxsize=64)
def _shape_fields(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (len(shape), *shape, *([0] * (_MAX_DIMS - len(shape))))


def encode_parts(key: BlockKey, block: torch.Tensor, codec: Codec | None = None) -> tuple[bytes, memoryview]:
    """(header with checksum, payload) of a block's stored value, without joining them: a
    store that can send the two back to back writes the value with no extra copy. The
    payload may share memory with `block`."""
    codec = codec or _CODECS_BY_ID[0]
    if block.dim() > _MAX_DIMS:
        raise ValueError(f"block has {block.dim()} dims; at most {_MAX_DIMS} are supported")
    if block.dtype not in DTYPE_IDS:
        raise ValueError(f"block dtype {block.dtype} is not storable")
    payload = codec.encode(block)
    if not isinstance(payload, memoryview) or payload.format != "B":
        payload = memoryview(payload).cast("B")
    head = _HEAD.pack(
        MAGIC, VERSION, codec.codec_id, DTYPE_IDS[block.dtype], *_shape_fields(tuple(block.shape)),
        key_digest(key), len(payload)
    )
    checksum = xxhash.xxh3_64_intdigest(payload, seed=xxhash.xxh3_64_intdigest(head))
    return head + _CHECKSUM.pack(checksum), payload


def encode_block(key: BlockKey, block: torch.Tensor, codec: Codec | None = None) -> bytes:
    """The block's stored value as one bytes object (a copy: safe to keep)."""
    return b"".join(encode_parts(key, block, codec))


def parse_header(value: bytes | memoryview, value_bytes: int | None = None
                 ) -> tuple[int, torch.dtype, tuple[int, ...], bytes, int]:
    """(codec id, dtype, shape, key digest, payload length) after structural checks.
    `value` may be the header alone when `value_bytes` gives the whole value's size."""
    if len(value) < HEADER_BYTES:
        raise CorruptBlock(f"value of {len(value)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, codec_id, dtype_id, ndim, *rest = _HEAD.unpack_from(value)
    shape, digest, length = rest[:_MAX_DIMS], rest[_MAX_DIMS], rest[_MAX_DIMS + 1]
    if magic != MAGIC:
        raise CorruptBlock("bad magic: not a kvtier block value")
    if version != VERSION:
        raise CorruptBlock(f"unsupported block format version {version}")
    if _codec_by_id(codec_id) is None or dtype_id not in _DTYPES or ndim > _MAX_DIMS:
        raise CorruptBlock(f"unknown codec {codec_id} / dtype {dtype_id} / ndim {ndim}")
    size = len(value) if value_bytes is None else value_bytes
    if size != HEADER_BYTES + length:
        raise CorruptBlock(f"value has {size - HEADER_BYTES} payload bytes, header says {length}")
    return codec_id, _DTYPES[dtype_id], tuple(shape[:ndim]), digest, length


def _checked(value: bytes | memoryview, digest: bytes | None):
    """Parse the header once and verify checksum and key: (codec id, dtype, shape, payload)."""
    codec_id, dtype, shape, stored_digest, _length = parse_header(value)
    view = memoryview(value)
    verify_payload(view[:HEADER_BYTES], view[HEADER_BYTES:])
    if digest is not None and stored_digest != digest:
        raise CorruptBlock("value belongs to another key")
    return codec_id, dtype, shape, view[HEADER_BYTES:]


def verify_payload(head: bytes | memoryview, payload: bytes | memoryview) -> None:
    """CorruptBlock unless the header's checksum matches this payload (and header)."""
    checksum = xxhash.xxh3_64_intdigest(payload, seed=xxhash.xxh3_64_intdigest(memoryview(head)[: _HEAD.size]))
    if checksum != _CHECKSUM.unpack_from(head, _HEAD.size)[0]:
        raise CorruptBlock("checksum mismatch")


def payload_destination(head: bytes | memoryview, value_bytes: int, digest: bytes, dst: torch.Tensor
                        ) -> memoryview | None:
    """For a reader that has only the header so far: dst's own bytes when the payload can be
    received straight into them (raw codec, dst's dtype and shape, a contiguous CPU tensor),
    else None (receive the whole value, then decode_into). CorruptBlock when the header is
    bad, belongs to another key, or has another shape. Verify the payload afterwards
    (verify_payload): until then dst holds unchecked bytes."""
    codec_id, dtype, shape, stored_digest, length = parse_header(head, value_bytes)
    if stored_digest != digest:
        raise CorruptBlock("value belongs to another key")
    if tuple(dst.shape) != shape:
        raise CorruptBlock(f"stored shape {shape} != {tuple(dst.shape)}")
    if codec_id != 0 or dtype != dst.dtype or dst.device.type != "cpu" or not dst.is_contiguous():
        return None
    if dtype.itemsize * dst.numel() != length:
        raise CorruptBlock("raw payload size does not match its shape")
    return memoryview(dst.view(torch.uint8).numpy()).cast("B")


def verify_value(value: bytes | memoryview, key: BlockKey | None = None) -> None:
    """Raise CorruptBlock unless the value is intact (and, given a key, stored under it)."""
    _checked(value, None if key is None else key_digest(key))


def decode_block(value: bytes | memoryview, key: BlockKey | None = None) -> torch.Tensor:
    """The block tensor in its original dtype and shape; CorruptBlock on any mismatch.

    The result may share memory with `value`: copy it before `value` goes away.
    """
    codec_id, dtype, shape, payload = _checked(value, None if key is None else key_digest(key))
    return _CODECS_BY_ID[codec_id].decode(payload, dtype, shape)


def decode_into(value: bytes | memoryview, digest: bytes, dst: torch.Tensor) -> int:
    """Verify a value stored under the key with this digest and copy its block into `dst`
    (same shape). Returns the value's size. The common case, a raw block into a contiguous
    CPU tensor of its dtype, is one memcpy with no tensor dispatch per block."""
    codec_id, dtype, shape, payload = _checked(value, digest)
    if tuple(dst.shape) != shape:
        raise CorruptBlock(f"stored shape {shape} != {tuple(dst.shape)}")
    if codec_id == 0 and dtype == dst.dtype and dst.device.type == "cpu" and dst.is_contiguous():
        if dtype.itemsize * dst.numel() != len(payload):
            raise CorruptBlock("raw payload size does not match its shape")
        # Sizes and contiguity are checked above: a plain memcpy is the cheapest copy.
        ctypes.memmove(dst.data_ptr(), np.frombuffer(payload, dtype=np.uint8).ctypes.data, len(payload))
    else:
        dst.copy_(_CODECS_BY_ID[codec_id].decode(payload, dtype, shape))
    return len(value)
