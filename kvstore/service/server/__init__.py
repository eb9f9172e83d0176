"""The `kvtier kv-server` process: gRPC handlers (servicer), the block store (memory LRU over
optional LMDB persistence), token auth and namespaces (auth), the health service, the
bulk-stream listener (bulk) with its connection admission, tickets and per-tenant limits
(admission, tickets, limits), glibc allocator settings (memory), and its CLI (main)."""
