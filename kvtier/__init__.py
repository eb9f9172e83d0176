"""kvtier: an LLM inference engine whose KV cache moves among device, CPU, disk and remote tiers.

Public names are re-exported lazily so `import kvtier` stays cheap (the CLI imports it
before it knows whether torch work is needed).
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "kvtier.engine.llm",
    "SamplingParams": "kvtier.engine.sampling_params",
    "RequestOutput": "kvtier.engine.outputs",
    "CompletionOutput": "kvtier.engine.outputs",
    "EngineConfig": "kvtier.engine.config",
    "ParkParams": "kvtier.engine.parking.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
