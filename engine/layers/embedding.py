"""Token embedding and the LM head; the head may share (tie) the embedding's weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class VocabEmbedding(torch.nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(torch.nn.Module):
    """hidden [S, hidden] -> float32 logits [S, vocab]. Tied: the embedding's own Parameter."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = torch.nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.invariant = None  # as Linear.invariant

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Matmul in the model dtype (as HF does), then float32 for sampling.
        if self.invariant is not None:
            return self.invariant.linear(hidden, self.weight).float()
        return F.linear(hidden, self.weight).float()
