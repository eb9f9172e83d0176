"""What every benchmark does with its result: print it as JSON, and keep a copy if asked.

Benchmarks import this module before torch: importing kvtier first gives their engines the
OpenMP spin default that kvtier's own processes get (kvtier/__init__.py).
"""
from __future__ import annotations

import importlib
import json
import tempfile

importlib.import_module("kvtier")  # for its side effect, before any benchmark imports torch


def emit(result: dict, out: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


def model_dir_or_small(model_dir: str | None, seed: int = 0) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """`model_dir`, else a random-weight `small` llama written to a temporary directory (kept
    until the returned handle is dropped)."""
    if model_dir is not None:
        return model_dir, None
    from kvtier.engine.make_model import make_model

    tmp = tempfile.TemporaryDirectory(prefix="kvtier-bench-")
    return make_model(tmp.name, arch="llama", size="small", seed=seed), tmp
