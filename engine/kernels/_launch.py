"""Small helpers shared by the kernel wrappers (imported only together with triton)."""
from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Launch on the tensor's own CUDA device (triton uses the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
