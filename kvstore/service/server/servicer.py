"""The kv-server's KVStore handlers (kvstore.proto); the health service is health.py.

Bad input is answered with a status and a message, never an exception that kills a worker:
empty / oversized keys and values failing their header, checksum or key check are
INVALID_ARGUMENT, a block larger than the whole store RESOURCE_EXHAUSTED (gRPC itself
answers RESOURCE_EXHAUSTED for a message over the limit), a namespace the token may not use
PERMISSION_DENIED (auth.py), an OpenBulk beyond the tenant's share of unused bulk tickets
RESOURCE_EXHAUSTED (tickets.py).
"""
from __future__ import annotations

import grpc

from kvtier.kvstore.tiers.byte_store import StoreUnavailable
from kvtier.kvstore.format.codec import HEADER_BYTES
from kvtier.kvstore.service.server.auth import NamespaceResolver
from kvtier.kvstore.service.server.tickets import TicketsExhausted
from kvtier.kvstore.service.server.store import MAX_KEY_BYTES, BlockStore, PutBatch, value_problem
from kvtier.kvstore.service.protocol import SERVICE
from kvtier.kvstore.service.wire import decode_chunks, pack, split_value
from kvtier.proto.kvtier.v1 import kvstore_pb2, kvstore_pb2_grpc

class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, namespaces: NamespaceResolver, max_message_bytes: int, bulk=None):
        self._store = store
        self._ns = namespaces
        self._max_message_bytes = max_message_bytes
        self._bulk = bulk  # the BulkListener (bulk.py), or None without a bulk stream

    def _keys(self, request_keys, context) -> list[bytes]:
        tag = self._ns.tag(context)
        for i, key in enumerate(request_keys):
            _check_key(key, i, context)
        return [tag + k for k in request_keys]

    def Lookup(self, request, context):
        present = self._store.contains(self._keys(request.keys, context))
        prefix = next((i for i, p in enumerate(present) if not p), len(present))
        return kvstore_pb2.LookupResponse(prefix_length=prefix, present=present)

    def Get(self, request, context):
        values = self._store.get_many(self._keys(request.keys, context))
        limit = self._max_message_bytes
        pieces = (piece for i, value in enumerate(values) if value is not None
                  for piece in split_value(i, b"", value, limit))
        yield from pack(pieces, limit)

    def Put(self, request_iterator, context):
        put = _PutStream(self._store, self._ns.tag(context), context)
        try:
            for message in request_iterator:
                if message is _MALFORMED:
                    put.refuse(grpc.StatusCode.INVALID_ARGUMENT, "malformed BlockChunks message")
                for chunk in message:
                    put.add(chunk)
            put.finish()
        finally:
            # All-or-nothing per block, not per call: every block that arrived whole and
            # verified is kept even when a later one is refused or the stream breaks.
            put.flush()
        return kvstore_pb2.PutResponse(stored=put.stored)

    def Delete(self, request, context):
        return kvstore_pb2.DeleteResponse(deleted=self._store.delete(self._keys(request.keys, context)))

    def Stats(self, request, context):
        self._ns.tag(context)  # same access rules as every other call
        return kvstore_pb2.StatsResponse(
            capacity_bytes=self._store.capacity_bytes,
            max_message_bytes=self._max_message_bytes,
            persistent=self._store.persistent,
            **self._store.snapshot(),
        )

    def OpenBulk(self, request, context):
        tag = self._ns.tag(context)  # the ticket carries this call's namespace to the connection
        bulk = self._bulk
        if bulk is None:
            return kvstore_pb2.OpenBulkResponse()  # port 0: no bulk stream here
        try:
            ticket = bulk.tickets.issue(tag, self._ns.tenant(context, tag))
        except TicketsExhausted as e:  # this tenant's share (or the server's cap) is used up
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return kvstore_pb2.OpenBulkResponse(port=bulk.port, host=bulk.advertised_host, ticket=ticket,
                                            ticket_ttl_ms=int(bulk.tickets.ttl_s * 1000), tls=bulk.tls)


_MALFORMED = object()


def _decode_or_marker(message: bytes):
    # Put answers INVALID_ARGUMENT for it; a deserializer that raises (or returns None)
    # would make gRPC answer INTERNAL.
    try:
        return decode_chunks(message)
    except ValueError:
        return _MALFORMED


def kvstore_handler(servicer: KVStoreServicer) -> grpc.GenericRpcHandler:
    """The KVStore service with the bulk messages (BlockChunks) encoded by service/wire.py, the
    small ones by the generated protobuf classes."""
    pb = kvstore_pb2
    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Lookup": unary(servicer.Lookup, pb.LookupRequest.FromString, pb.LookupResponse.SerializeToString),
        "Get": grpc.unary_stream_rpc_method_handler(servicer.Get, pb.GetRequest.FromString, None),  # yields bytes
        "Put": grpc.stream_unary_rpc_method_handler(servicer.Put, _decode_or_marker, pb.PutResponse.SerializeToString),
        "Delete": unary(servicer.Delete, pb.DeleteRequest.FromString, pb.DeleteResponse.SerializeToString),
        "Stats": unary(servicer.Stats, pb.StatsRequest.FromString, pb.StatsResponse.SerializeToString),
        "OpenBulk": unary(servicer.OpenBulk, pb.OpenBulkRequest.FromString, pb.OpenBulkResponse.SerializeToString),
    })


class _PutStream:
    """Reassembles one Put stream's chunks into blocks, checks each block, and hands the
    verified ones to the store in batches (one LMDB transaction per batch, not per block)."""

    def __init__(self, store: BlockStore, tag: bytes, context):
        self._store, self._tag, self._context = store, tag, context
        self.index = 0  # blocks completed so far: the number of the block being received
        self._key: bytes | None = None
        self._parts: list = []
        self._expected = self._received = 0
        self._batch = PutBatch(store)

    @property
    def stored(self) -> int:
        return self._batch.stored

    def refuse(self, code: grpc.StatusCode, problem: str, rejected: bool = False):
        if rejected:
            self._store.reject()
        _abort(self._context, code, f"block {self.index}: {problem}")

    def add(self, chunk) -> None:
        data = chunk.data  # a view into the received message (service/wire.py)
        if chunk.key:  # the first chunk of the next block
            if self._key is not None:
                self.refuse(grpc.StatusCode.INVALID_ARGUMENT, "next block began before this one was complete")
            _check_key(chunk.key, self.index, self._context)
            capacity = self._store.capacity_bytes
            if chunk.total_size > capacity:
                self.refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{chunk.total_size} bytes exceed the store's capacity of {capacity}", rejected=True)
            if chunk.total_size < HEADER_BYTES:
                self.refuse(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{chunk.total_size} bytes is shorter than a block header", rejected=True)
            self._key, self._parts, self._expected, self._received = chunk.key, [], chunk.total_size, 0
        elif self._key is None:
            self.refuse(grpc.StatusCode.INVALID_ARGUMENT, "empty key")
        if chunk.offset != self._received or self._received + len(data) > self._expected:
            self.refuse(grpc.StatusCode.INVALID_ARGUMENT, f"chunk at offset {chunk.offset} (+{len(data)}) "
                        f"does not continue {self._received} of {self._expected} bytes")
        self._parts.append(data)
        self._received += len(data)
        if self._received == self._expected:
            self._complete()

    def _complete(self) -> None:
        parts = self._parts
        if len(parts) > 1:
            value = b"".join(parts)
        elif len(parts[0]) * 2 >= len(parts[0].obj):
            value = parts[0]  # the block is (nearly) its whole message: keep the view
        else:
            value = bytes(parts[0])  # a small block sharing a message: do not pin the rest
        problem = value_problem(self._key, value)
        if problem is not None:
            self.refuse(grpc.StatusCode.INVALID_ARGUMENT, problem, rejected=True)
        key, self._key, self._parts = self._key, None, []
        self.index += 1
        try:
            self._batch.add(self._tag + key, value)
        except StoreUnavailable as e:
            _abort(self._context, grpc.StatusCode.UNAVAILABLE, f"persistent store failed: {e}")

    def finish(self) -> None:
        if self._key is not None:
            self.refuse(grpc.StatusCode.INVALID_ARGUMENT,
                        f"stream ended inside the block ({self._received} of {self._expected} bytes)")

    def flush(self) -> None:
        try:
            self._batch.flush()
        except StoreUnavailable as e:
            _abort(self._context, grpc.StatusCode.UNAVAILABLE, f"persistent store failed: {e}")


def _check_key(key: bytes, index: int, context) -> None:
    if not key:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"key {index} is empty")
    if len(key) > MAX_KEY_BYTES:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"key {index} has {len(key)} bytes; at most {MAX_KEY_BYTES} are allowed")


def _abort(context, code: grpc.StatusCode, message: str):
    context.abort(code, message)  # raises: the call ends here with this status
