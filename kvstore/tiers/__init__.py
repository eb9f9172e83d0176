"""KV tiers: the `Tier` interface (base), the byte-store base class, spec parsing
(`cpu:4GiB`, `lmdb:PATH`, `redis://`, `grpc://`), one module per tier, the LMDB store the
`lmdb:` tier and the kv-server share (lmdb_store), and the one write queue a hierarchy
keeps per slow tier (background_writer)."""
