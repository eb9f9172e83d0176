"""kvtier.v1: the KV service protocol (kvstore.proto) and the health messages (health.proto)."""
