"""Regenerate the Python stubs from the .proto sources (the single source of truth).

    python proto/generate.py          # rewrites proto/kvtier/v1/*_pb2*.py in place

protoc names imports after the proto path (`from kvtier.v1 import kvstore_pb2`), but the
stubs live inside the installed package as `kvtier.proto.kvtier.v1`; the import lines are
rewritten so the stubs work wherever kvtier is installed. tests/test_proto_stubs.py runs
this into a temporary folder and fails if the committed stubs differ.
"""
from __future__ import annotations

import importlib.resources
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = "kvtier.proto"  # import name of PROTO_ROOT
# (proto file, whether it declares a service and needs a _pb2_grpc module)
SOURCES = [("kvtier/v1/kvstore.proto", True), ("kvtier/v1/health.proto", False)]


def _package_qualify(text: str) -> str:
    # `from kvtier.v1 import x_pb2` -> `from kvtier.proto.kvtier.v1 import x_pb2`
    return re.sub(r"^from (kvtier\.v1) import ", rf"from {PACKAGE}.\1 import ", text, flags=re.M)


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root (mirroring the proto paths); the files written."""
    from grpc_tools import protoc  # a build/test-time tool only, not a runtime dependency

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    written: list[Path] = []
    for source, has_service in SOURCES:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}"]
        if has_service:
            args.append(f"--grpc_python_out={out_root}")
        args.append(str(PROTO_ROOT / source))
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {source}")
        stem = source[: -len(".proto")]
        outputs = [f"{stem}_pb2.py"] + ([f"{stem}_pb2_grpc.py"] if has_service else [])
        for name in outputs:
            path = out_root / name
            path.write_text(_package_qualify(path.read_text()))
            written.append(path)
    return written


def main() -> int:
    for path in generate(PROTO_ROOT):
        print(path.relative_to(PROTO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
