"""Triton kernels for the GPU path: paged attention, KV writes, block copies for tiers, fp8.

Nothing here imports triton at kvtier import time: each kernel lives in its own module
(`paged_attention_triton`, `kv_write_triton`, `block_copy_triton`, `fp8_triton`), imported only
by code that has checked `triton_available()`. Each module keeps the torch reference its
kernel is tested against beside it (docs/kernels.md).

Triton decides between compiling and interpreting when a kernel is *defined* (module import),
from the TRITON_INTERPRET environment variable: set it to 1 before importing a kernel module
to run the kernels on CPU tensors through the interpreter (how the tests run without a GPU).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch

_TRUE = {"1", "true", "yes", "on", "y"}


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter (triton's own reading of it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton.language")  # what the kernel modules import
    except Exception as e:  # a broken install (e.g. a wheel for another platform) is "not usable"
        # Logged once: the answer is cached, and a silent fallback would hide the reason.
        logging.getLogger(__name__).warning("triton is installed but cannot be imported (%s: %s); "
                                            "the triton kernels are disabled", type(e).__name__, e)
        return False
    return True


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the triton kernels can run on `device` (default: CUDA when present, else CPU).

    True when triton imports and either the device is a present CUDA device, or the
    interpreter is on (TRITON_INTERPRET=1), which runs the kernels on CPU tensors.
    """
    if not _triton_imports():
        return False
    if interpreter_enabled():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()
