"""The one Linear every projection goes through, so a batch-invariant matmul can replace it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear(torch.nn.Module):
    """y = x @ W^T + b with W: [out_features, in_features] (the HF/PyTorch layout).

    Fused projections (qkv, gate_up) are one Linear whose rows are the concatenated shards;
    the model's weight loader copies each HF tensor into its row range.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.empty(out_features)) if bias else None
        # Set by deterministic mode (layers/batch_invariant.py): a row-invariant matmul.
        self.invariant = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invariant is not None:
            return self.invariant.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
