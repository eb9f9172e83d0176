"""BlockChunks (kvstore.proto) on the wire without building protobuf objects: the bulk path.

Every block crosses Python several times per call, and protobuf's Python API copies the
`data` field on construction, on serialization, on parsing and again on every attribute
read. For MiB-sized blocks those copies, not the network, set the throughput. Here a
message is serialized with a single join and parsed into memoryviews of the received
buffer, so Get and Put move each block with fewer copies per hop. `pack` fills messages up
to the limit: small blocks share a message (a gRPC message costs ~0.2 ms in Python, as
much as moving 200 KiB), large ones are split. The encoding is plain protobuf: any protobuf
client or server interoperates, and tests/test_kv_wire.py checks both directions against
the generated classes (the slow, obviously correct reference).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

# field number << 3 | wire type (0: varint, 2: length-delimited), as in kvstore.proto
_INDEX, _KEY, _TOTAL, _OFFSET, _DATA = 1, 2, 3, 4, 5
_TAG = {f: bytes([(f << 3) | (2 if f in (_KEY, _DATA) else 0)]) for f in (_INDEX, _KEY, _TOTAL, _OFFSET, _DATA)}


class WireChunk(NamedTuple):
    index: int
    key: bytes
    total_size: int
    offset: int
    data: memoryview  # a view into the message buffer: no copy


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(*, index: int = 0, key: bytes = b"", total_size: int = 0, offset: int = 0, data=b"") -> bytes:
    """The protobuf encoding of one BlockChunk (proto3: default-valued fields are left out)."""
    return b"".join(_chunk_parts(index, key, total_size, offset, data))


def _chunk_parts(index: int, key: bytes, total_size: int, offset: int, data) -> list:
    parts = []
    if index:
        parts += (_TAG[_INDEX], _varint(index))
    if key:
        parts += (_TAG[_KEY], _varint(len(key)), key)
    if total_size:
        parts += (_TAG[_TOTAL], _varint(total_size))
    if offset:
        parts += (_TAG[_OFFSET], _varint(offset))
    if isinstance(data, tuple):  # a value still in its (header, payload) pieces: no join
        size = sum(len(d) for d in data)
        if size:
            parts += (_TAG[_DATA], _varint(size), *data)
    elif len(data):
        parts += (_TAG[_DATA], _varint(len(data)), data)
    return parts


_CHUNKS_TAG = bytes([(1 << 3) | 2])  # BlockChunks.chunks


# Pieces are packed into messages of about this size: large enough that the per-message
# cost is spread thin, small enough that sending one message overlaps encoding the next.
PACK_TARGET_BYTES = 4 << 20


def pack(pieces: Iterable[tuple[int, bytes, int, int, object]], max_message_bytes: int) -> Iterator[bytes]:
    """BlockChunks messages from (index, key, total_size, offset, data) pieces, in order:
    as many pieces as fit in min(max_message_bytes, PACK_TARGET_BYTES), or one piece alone.
    Each piece must fit max_message_bytes on its own (split_value makes sure)."""
    max_message_bytes = min(max_message_bytes, PACK_TARGET_BYTES)
    parts: list = []
    size = 0
    for piece in pieces:
        inner = _chunk_parts(*piece)
        inner_size = sum(len(p) for p in inner)
        head = _varint(inner_size)
        entry = 1 + len(head) + inner_size
        if parts and size + entry > max_message_bytes:
            yield b"".join(parts)
            parts, size = [], 0
        parts += (_CHUNKS_TAG, head, *inner)
        size += entry
    if parts:
        yield b"".join(parts)


def split_value(index: int, key: bytes, value, max_message_bytes: int) -> Iterator[tuple]:
    """The pieces of one block, each small enough to travel in a message of its own.
    `value` is bytes or a (header, payload) tuple from codec.encode_parts."""
    limit = max(1, max_message_bytes - PIECE_OVERHEAD - len(key))
    n = sum(len(v) for v in value) if isinstance(value, tuple) else len(value)
    if n <= limit:
        yield index, key, n, 0, value
        return
    if isinstance(value, tuple):
        value = b"".join(value)  # a block bigger than a message: split the joined value
    view = memoryview(value)
    for offset in range(0, n, limit):
        yield index, key if offset == 0 else b"", n, offset, view[offset : offset + limit]


# Bytes a piece adds besides its key and data: outer tag + length (<= 1 + 5 for pieces
# under 4 GiB), index (<= 6), key tag + length (<= 3), total and offset (<= 11 each), data
# tag + length (<= 6); rounded up.
PIECE_OVERHEAD = 64


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def decode_chunks(message: bytes) -> list[WireChunk]:
    """Parse a BlockChunks message; ValueError on malformed input."""
    buf = memoryview(message)
    chunks = []
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        wire_type = tag & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("length-delimited field runs past the message")
            if tag >> 3 == 1:
                chunks.append(decode_chunk(buf[pos : pos + length]))
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if pos != end:
        raise ValueError("message ends inside a field")
    return chunks


def decode_chunk(message: bytes | memoryview) -> WireChunk:
    """Parse a BlockChunk; ValueError on malformed input. Unknown fields are skipped and a
    repeated scalar field keeps its last value, as protobuf parsers do."""
    buf = memoryview(message)
    fields = {_INDEX: 0, _KEY: b"", _TOTAL: 0, _OFFSET: 0, _DATA: buf[0:0]}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("length-delimited field runs past the message")
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type in (1, 5):  # fixed64 / fixed32 of some unknown field
            pos += 8 if wire_type == 1 else 4
            value = None
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if number in fields and value is not None:
            if (wire_type == 2) != (number in (_KEY, _DATA)):
                raise ValueError(f"field {number} has the wrong wire type {wire_type}")
            fields[number] = value
    if pos != end:
        raise ValueError("message ends inside a field")
    mask = (1 << 64) - 1  # uint64 fields wrap like protobuf's; uint32 index is truncated
    return WireChunk(fields[_INDEX] & 0xFFFFFFFF, bytes(fields[_KEY]), fields[_TOTAL] & mask,
                     fields[_OFFSET] & mask, fields[_DATA])
