"""Loading Hugging Face-named tensors into a model: one copy loop for every architecture."""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch


@torch.no_grad()
def load_named(model_name: str, targets: dict[str, torch.Tensor], named_tensors: Iterable[tuple[str, torch.Tensor]],
               skip: re.Pattern | None = None) -> None:
    """Copy HF-named tensors onto `targets` (parameters, or row ranges of fused ones);
    ValueError on an unknown name, a shape mismatch or a tensor left missing at the end.
    Names matching `skip` are ignored."""
    loaded: set[str] = set()
    for name, tensor in named_tensors:
        if skip is not None and skip.match(name):
            continue
        if name not in targets:
            raise ValueError(f"unexpected tensor {name!r} for {model_name}")
        param = targets[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                             f"{tuple(param.shape)}")
        param.copy_(tensor)
        loaded.add(name)
    missing = [n for n in targets if n not in loaded]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"missing tensor(s): {shown}")


def skip_pattern(*patterns: str) -> re.Pattern | None:
    """One regex for the names a checkpoint may carry that the model does not load."""
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def tied_head(tie_word_embeddings: bool) -> tuple[str, ...]:
    """A tied checkpoint may still store the head: the embedding governs, so it is skipped."""
    return (r"^lm_head\.weight$",) if tie_word_embeddings else ()
