"""kvtier.proto: the kvtier gRPC protocol sources (`kvtier/v1/*.proto`), their generated
stubs, and `generate.py`, which regenerates them (a test keeps them in sync)."""
