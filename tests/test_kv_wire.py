"""kv_wire (the hand-written BlockChunk encoding) against the generated protobuf classes."""
import random

import pytest

from kvtier.kvstore.service.wire import PACK_TARGET_BYTES, decode_chunk, decode_chunks, encode_chunk, pack, split_value
from kvtier.proto.kvtier.v1 import kvstore_pb2 as pb

FIELDS = ("index", "key", "total_size", "offset", "data")


def random_fields(rng: random.Random) -> dict:
    return {
        "index": rng.choice([0, 1, 127, 128, 300, 2**32 - 1]),
        "key": rng.randbytes(rng.choice([0, 1, 41, 200])),
        "total_size": rng.choice([0, 1, 2**20, 2**40 + 7, 2**64 - 1]),
        "offset": rng.choice([0, 5, 2**21, 2**63]),
        "data": rng.randbytes(rng.choice([0, 1, 127, 128, 70000])),
    }


def test_encoding_is_what_protobuf_parses_and_writes():
    rng = random.Random(0)
    for _ in range(300):
        fields = random_fields(rng)
        wire = encode_chunk(**fields)
        assert wire == pb.BlockChunk(**fields).SerializeToString()
        parsed = pb.BlockChunk.FromString(wire)
        assert {f: getattr(parsed, f) for f in FIELDS} == fields
        decoded = decode_chunk(pb.BlockChunk(**fields).SerializeToString())
        assert decoded.data.tobytes() == fields["data"]
        assert decoded._replace(data=fields["data"]) == tuple(fields[f] for f in FIELDS)


def test_decoding_accepts_any_field_order_unknown_fields_and_repeats():
    msg = pb.BlockChunk(index=3, key=b"k", total_size=10, offset=0, data=b"0123456789")
    parts = [pb.BlockChunk(**{f: getattr(msg, f)}).SerializeToString() for f in FIELDS]
    unknown = b"".join([bytes([(9 << 3) | 0, 5]), bytes([(10 << 3) | 2, 2]) + b"xy",
                        bytes([(11 << 3) | 1]) + bytes(8), bytes([(12 << 3) | 5]) + bytes(4)])
    wire = b"".join(reversed(parts)) + unknown + pb.BlockChunk(index=4).SerializeToString()
    decoded = decode_chunk(wire)
    reference = pb.BlockChunk.FromString(wire)
    assert decoded.index == reference.index == 4  # the last occurrence wins, as in protobuf
    assert (decoded.key, decoded.total_size, decoded.data.tobytes()) == (b"k", 10, b"0123456789")


@pytest.mark.parametrize("bad", [
    b"\x2a\x05abc",  # data says 5 bytes, 3 follow
    b"\x08",  # a varint that never ends
    b"\x08" + b"\xff" * 11,  # an overlong varint
    b"\x0b",  # wire type 3 (groups) is not supported
    b"\x10\x01",  # key (field 2) as a varint
])
def test_malformed_messages_are_value_errors(bad):
    with pytest.raises(ValueError):
        decode_chunk(bad)


def test_pack_and_split_make_protobuf_block_chunks_within_the_limit():
    rng = random.Random(1)
    values = [rng.randbytes(rng.choice([10, 5000, 70000, 300000])) for _ in range(40)]
    keys = [rng.randbytes(41) for _ in values]
    for limit in (4096, 65536, 1 << 20):
        pieces = [p for i, (k, v) in enumerate(zip(keys, values)) for p in split_value(i, k, v, limit)]
        messages = list(pack(pieces, limit))
        assert all(len(m) <= min(limit, PACK_TARGET_BYTES) or len(pb.BlockChunks.FromString(m).chunks) == 1
                   for m in messages)
        assert all(len(m) <= limit for m in messages)
        parsed = [c for m in messages for c in pb.BlockChunks.FromString(m).chunks]
        decoded = [c for m in messages for c in decode_chunks(m)]
        assert len(parsed) == len(decoded) == len(pieces)
        for ref, fast, piece in zip(parsed, decoded, pieces):
            assert (ref.index, ref.key, ref.total_size, ref.offset, ref.data) == (*piece[:4], bytes(piece[4]))
            assert fast._replace(data=bytes(fast.data)) == (*piece[:4], bytes(piece[4]))
        for i, (k, v) in enumerate(zip(keys, values)):  # reassembly
            assert b"".join(bytes(c.data) for c in decoded if c.index == i) == v
    if len(messages) > 1:
        assert decode_chunks(messages[0] + messages[1]) == decode_chunks(messages[0]) + decode_chunks(messages[1])


def test_split_parts_equal_the_joined_value():
    """A (header, payload) value travels exactly as its joined bytes would."""
    from kvtier.kvstore.service.wire import pack, split_value

    head, payload = b"H" * 72, memoryview(bytes(range(256)) * 40)
    joined = head + bytes(payload)
    for limit in (1 << 20, 4096):  # one piece, and split across messages
        a = list(pack(split_value(3, b"k" * 41, (head, payload), limit), limit))
        b = list(pack(split_value(3, b"k" * 41, joined, limit), limit))
        assert a == b
