"""The triton block gather / scatter as the connectors' `BlockCopy` (connectors/device_copy.py),
for tier saves and loads of CUDA pools. Importing this module does not import triton."""
from __future__ import annotations

import torch

from kvtier.engine.kernels import triton_available


class TritonBlockCopy:
    """One launch per batch of blocks each way; the staging side may be pinned host memory."""

    def __init__(self):
        from kvtier.engine.kernels.block_copy_triton import gather_blocks, scatter_blocks

        self._gather, self._scatter = gather_blocks, scatter_blocks

    def gather(self, pool: torch.Tensor, block_ids: torch.Tensor, staging: torch.Tensor) -> None:
        self._gather(pool, block_ids, staging)

    def scatter(self, staging: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor) -> None:
        self._scatter(staging, pool, block_ids)


def block_copy_for(device: torch.device | str) -> TritonBlockCopy | None:
    """The kernel copy for pools on `device`: CUDA with triton usable; None elsewhere (CPU
    pools need no staging: the hierarchy copies straight out of them)."""
    device = torch.device(device)
    if device.type != "cuda" or not triton_available(device):
        return None
    return TritonBlockCopy()
