"""The `kvtier kv-server` process: gRPC handlers (servicer), the block store, token auth
and namespaces, the health service, the bulk-stream listener, and its CLI (main)."""
