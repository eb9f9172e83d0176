"""kvtier: an LLM inference engine whose KV cache moves among device, CPU, disk and remote tiers.

Public names are re-exported lazily so `import kvtier` stays cheap (the CLI imports it
before it knows whether torch work is needed).
"""
from __future__ import annotations

import os

__version__ = "0.1.0"

# torch's OpenMP workers spin for a long while at every barrier. When anything else wants the
# cores (a server's event loop, its clients, another process) a descheduled worker stalls
# the others: steps ran up to 4x slower on a 2-core machine (README, "CPU threads"); a short
# spin keeps the speed of an idle machine. Read by libgomp when torch loads, so it only takes
# effect when kvtier is imported before torch; a value set by the user is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

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
