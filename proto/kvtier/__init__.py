"""Generated protobuf / gRPC stubs of the kvtier protocol (regenerate with proto/generate.py)."""
