"""kvtier's KV service: the protocol shared by both ends (`protocol`, `wire` for gRPC
chunking, `bulk_protocol` for the bulk stream, `tls` for its certificate checks), the client
(`client`, `bulk_client`, `rendezvous` sharding), and the server under `server/`."""
