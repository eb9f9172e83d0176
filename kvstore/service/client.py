"""One connection to one kv-server: the calls GrpcTier makes, each with a deadline.

Block bytes go over the server's bulk stream (bulk_client.py) when it has one, else as
gRPC Put / Get streams, whose BlockChunks messages wire.py encodes; the rest goes
through the generated stubs. Calls raise grpc.RpcError or OSError (the bulk stream); GrpcTier turns
either into misses and the circuit breaker. When the bulk stream refuses or drops a call (a
server limit, bulk_client.BulkClient.refused), the same call goes through gRPC instead.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import grpc
import torch

from kvtier.kvstore.tiers.byte_store import decode_values
from kvtier.kvstore.circuit_breaker import CircuitBreaker
from kvtier.kvstore.format.codec import Codec, encode_parts, key_digest
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.bulk_client import BulkClient
from kvtier.kvstore.service.bulk_protocol import RESOURCE_EXHAUSTED, BulkError
from kvtier.kvstore.service.protocol import SERVICE
from kvtier.kvstore.service.wire import decode_chunks, pack, split_value
from kvtier.proto.kvtier.v1 import kvstore_pb2 as pb
from kvtier.proto.kvtier.v1 import kvstore_pb2_grpc


class KVServerClient:
    def __init__(self, address: str, channel: grpc.Channel, *, metadata, timeout_s: float, max_message_bytes: int,
                 breaker: CircuitBreaker, bulk: Callable[..., BulkClient] | None = None):
        self.address = address
        self.channel = channel
        self.breaker = breaker
        self.down = False  # only for logging the transitions
        self._metadata = metadata
        self._timeout = timeout_s
        self._max_message = max_message_bytes
        self._stub = kvstore_pb2_grpc.KVStoreStub(channel)
        self._get = channel.unary_stream(f"/{SERVICE}/Get", request_serializer=pb.GetRequest.SerializeToString,
                                         response_deserializer=decode_chunks)
        self._put = channel.stream_unary(f"/{SERVICE}/Put", request_serializer=None,  # already encoded
                                         response_deserializer=pb.PutResponse.FromString)
        # bulk(host, open_bulk) makes the BulkClient; None: blocks always go through gRPC
        self.bulk = bulk(address.rpartition(":")[0].strip("[]"), self._open_bulk) if bulk else None

    def _open_bulk(self):
        try:
            return self._stub.OpenBulk(pb.OpenBulkRequest(), timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server from before the bulk stream
                return pb.OpenBulkResponse()
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # no ticket for us now: BulkClient uses gRPC
                raise BulkError(f"OpenBulk: {e.details()}", RESOURCE_EXHAUSTED) from e
            raise

    def lookup(self, keys: list[bytes]) -> list[bool]:
        reply = self._stub.Lookup(pb.LookupRequest(keys=keys), timeout=self._timeout, metadata=self._metadata)
        return list(reply.present) if len(reply.present) == len(keys) else [False] * len(keys)

    def get(self, keys: list[bytes]) -> list[memoryview | bytearray | None]:
        """Values in key order (None where absent); a block that arrives in one piece stays a
        view into its message, a split one is assembled in a bytearray."""
        out: list = [None] * len(keys)
        buf, index = None, -1
        stream = self._get(pb.GetRequest(keys=keys), timeout=self._timeout, metadata=self._metadata)
        for chunk in (chunk for message in stream for chunk in message):
            data, total = chunk.data, chunk.total_size
            if chunk.index >= len(keys):
                continue  # not ours; the value checksum guards everything else
            if chunk.offset == 0:
                if len(data) == total:  # the common case
                    out[chunk.index] = data
                    continue
                buf, index = bytearray(total), chunk.index
            if buf is None or chunk.index != index or chunk.offset + len(data) > len(buf):
                buf = None  # out of order: this block is a miss
                continue
            buf[chunk.offset : chunk.offset + len(data)] = data
            if chunk.offset + len(data) == len(buf):
                out[index], buf = buf, None
        return out

    def get_into(self, keys: Sequence[BlockKey], into: Sequence[torch.Tensor]) -> tuple[list[bool], list[int], int]:
        """Read and decode into the tensors: (ok flags, positions of corrupt values, bytes read)."""
        raw = [k.to_bytes() for k in keys]
        sock = self.bulk.connection() if self.bulk is not None else None
        if sock is not None:
            try:
                return self.bulk.get_into(sock, raw, [key_digest(k) for k in keys], list(into))
            except OSError as e:
                if not self.bulk.refused(e):
                    raise
        return decode_values(self.get(raw), keys, into)

    def put_values(self, keys: list[bytes], values: Sequence[bytes]) -> None:
        self._send(lambda: zip(keys, values))

    def _send(self, items: Callable[[], Iterable]) -> None:
        """Send the (key, value) pairs that `items()` yields: over the bulk stream, or over
        gRPC's Put when there is none or it refused or dropped the call (items() again:
        re-putting a block the bulk stream did store is harmless)."""
        sock = self.bulk.connection() if self.bulk is not None else None
        if sock is not None:
            try:
                self.bulk.put(sock, items())
                return
            except OSError as e:
                if not self.bulk.refused(e):
                    raise
        self._put(self._messages(items()), timeout=self._timeout, metadata=self._metadata)

    def put_blocks(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor], codec: Codec) -> int:
        """Encode and send; returns the bytes sent. Each block is encoded as the stream
        reaches it: on a gRPC stream, block i+1 is encoded while gRPC still sends block i
        (measured: +15-50% put throughput over encoding the whole batch first), and on the
        bulk stream each block leaves from its pieces while they are in cache."""
        sent = [0]
        failure: list[BaseException] = []

        def values():
            sent[0], failure[:] = 0, []  # a fallback to gRPC starts over
            for key, block in zip(keys, blocks):
                try:
                    value = encode_parts(key, block, codec)  # joined only inside the message
                except Exception as e:  # a caller's bug, not the server's: re-raised below
                    failure.append(e)
                    return  # the stream ends at a block boundary; what was sent is stored
                sent[0] += len(value[0]) + len(value[1])
                yield key.to_bytes(), value

        try:
            self._send(values)
        finally:
            if failure:
                raise failure[0]
        return sent[0]

    def _messages(self, items):
        limit = self._max_message
        return pack((piece for key, value in items for piece in split_value(0, key, value, limit)), limit)

    def delete(self, keys: list[bytes]) -> None:
        self._stub.Delete(pb.DeleteRequest(keys=keys), timeout=self._timeout, metadata=self._metadata)

    def stats(self) -> dict:
        reply = self._stub.Stats(pb.StatsRequest(), timeout=self._timeout, metadata=self._metadata)
        return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}

    def close(self) -> None:
        if self.bulk is not None:
            self.bulk.close()
        self.channel.close()
