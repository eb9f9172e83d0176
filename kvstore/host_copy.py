"""Block copies between host tensors on the calling thread alone.

torch runs a copy larger than its grain size on an OpenMP team, and each thread that does
so gets a team of its own. Tier loads and promotions run on loader threads: their teams
would give the process more OpenMP threads than cores, and libgomp then shortens the
barrier spin of every team, the engine's included, which slows each forward pass (README,
"`kvtier serve` under load"). A block is small and memory-bound, so one memmove is as fast.
"""
from __future__ import annotations

import ctypes

import torch


def copy_block(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), as one memmove when both are contiguous host tensors of one dtype and
    size; any other pair (a device, a strided view, a conversion) goes through copy_."""
    if (dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.shape == src.shape and dst.is_contiguous() and src.is_contiguous()):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src)


def clone_block(src: torch.Tensor) -> torch.Tensor:
    """A private host copy of src (a device block comes down through torch)."""
    if src.device.type != "cpu":
        return src.detach().to("cpu", copy=True)
    out = torch.empty(src.shape, dtype=src.dtype)
    copy_block(out, src.detach())
    return out
