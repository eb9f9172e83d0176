"""SwiGLU's gate: silu(gate) * up over a fused [.., 2 * intermediate] input."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SiluAndMul(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
