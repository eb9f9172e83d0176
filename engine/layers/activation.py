"""SwiGLU's gate: silu(gate) * up over a fused [.., 2 * intermediate] input."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.engine.layers.batch_invariant import exact_silu


class SiluAndMul(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.exact = False  # deterministic mode: a silu that rounds the same at any batch size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        if self.exact:
            return exact_silu(gate).mul_(up)
        return F.silu(gate) * up
