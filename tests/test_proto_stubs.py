"""The committed gRPC stubs match what grpcio-tools generates from the .proto sources."""
import importlib.util
import re
from pathlib import Path


import grpc_tools  # noqa: F401  (the test extra installs it; a missing one must fail, not skip)

ROOT = Path(__file__).resolve().parents[1]
# proto/generate.py, the regeneration script (a script, not part of the package)
_spec = importlib.util.spec_from_file_location("kvtier_proto_generate", ROOT / "proto" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

# Lines that only record which protoc / grpcio-tools made the file: a newer grpcio-tools
# must not turn the check red while the protocol itself is unchanged.
_VERSION_LINES = [
    (r"# Protobuf Python Version: \S+", "# Protobuf Python Version: X"),
    (r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,", r"\1 X,"),
    (r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = 'X'"),
]


def _normalized(text: str) -> str:
    for pattern, replacement in _VERSION_LINES:
        text = re.sub(pattern, replacement, text)
    return text


def test_committed_stubs_match_the_proto_sources(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "generate() wrote nothing"
    for fresh in written:
        rel = fresh.relative_to(tmp_path)
        committed = ROOT / "proto" / rel
        assert committed.exists(), f"{rel} is not committed; run python proto/generate.py"
        assert _normalized(committed.read_text()) == _normalized(fresh.read_text()), (
            f"proto/{rel} is stale; run python proto/generate.py"
        )


def test_stubs_import_inside_the_package():
    from kvtier.proto.kvtier.v1 import health_pb2, kvstore_pb2, kvstore_pb2_grpc

    assert kvstore_pb2_grpc.KVStoreStub is not None
    assert kvstore_pb2.DESCRIPTOR.package == "kvtier.v1"
    assert health_pb2.HealthCheckResponse.SERVING == 1
