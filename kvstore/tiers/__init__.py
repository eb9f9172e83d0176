"""KV tiers: the `Tier` interface (base), the byte-store base class, spec parsing
(`cpu:4GiB`, `lmdb:PATH`, `redis://`, `grpc://`) and one module per tier."""
