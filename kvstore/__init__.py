"""kvtier.kvstore: where KV blocks live outside the device pool.

- `keys`, `stats`, `hierarchy`: block keys, per-tier counters, and the ordered tier
  hierarchy (cpu -> lmdb -> redis|grpc) the built-in connector drives.
- `format/`: the stored-value format (header, checksum, codec registry; raw and fp8).
- `tiers/`: the `Tier` interface, the byte-store base, tier-spec parsing and the tiers.
- `service/`: kvtier's KV service: shared protocol, gRPC chunking, bulk stream, the
  client, and `service/server/` (the `kvtier kv-server` process).
- `socket_io`, `circuit_breaker`: small helpers the tiers and the service share.

Nothing here imports `kvtier.engine` or `kvtier.connectors` (the layers above).
"""
