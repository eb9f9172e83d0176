"""Names and transport settings that the kv-server and its clients share."""
from __future__ import annotations

from kvtier.proto.kvtier.v1 import kvstore_pb2

SERVICE = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name

# Read from TCP in large chunks: with gRPC's small default reads, receiving a MiB-sized block
# costs more CPU than everything else on its path (measured: put throughput +40%, and half
# the server's CPU). Used by the server and by GrpcTier's channels.
BULK_TRANSFER_OPTIONS = [
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
]
