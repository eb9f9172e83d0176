"""Prompts as users give them (text, token ids, dicts), turned into one shape."""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Prompt:
    text: str | None
    token_ids: list  # ints once valid; anything else is reported by invalid_token_ids
    cache_salt: str | None = None


def token_id_list(ids) -> list:
    """Token ids from a list / tuple of integers (Python, numpy or torch scalars) or a 1-D
    numpy array / torch tensor, as plain ints. Items that are not integers are kept as they
    are, so the request fails alone with a message naming them."""
    if hasattr(ids, "tolist") and hasattr(ids, "ndim"):  # numpy array, torch tensor
        if ids.ndim != 1:
            raise ValueError(f"prompt_token_ids: expected a 1-D sequence of ids, got {ids.ndim} dimensions")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"prompt_token_ids: expected a sequence of integers, got {type(ids).__name__}")
    out = []
    for t in ids:
        if not isinstance(t, (int, bool)) and not isinstance(t, float):
            try:
                t = operator.index(t)  # numpy / torch integer scalars
            except TypeError:
                pass
        out.append(t)
    return out


def invalid_token_ids(token_ids: list, vocab_size: int) -> str | None:
    """Why these ids cannot run, or None."""
    if not token_ids:
        return "prompt is empty"
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int):
            return f"prompt token id {t!r} is not an integer (a {type(t).__name__})"
        if not 0 <= t < vocab_size:
            return f"prompt token id {t!r} is outside the vocabulary [0, {vocab_size})"
    return None


def parse_prompt(prompt, tokenize: Callable[[str], list[int]]) -> Prompt:
    """str, {"prompt": str} or {"prompt_token_ids": ids} (optionally with "cache_salt"), or ids."""
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, dict):
        salt = prompt.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise ValueError("cache_salt: must be a string")
        if "prompt_token_ids" in prompt:
            return Prompt(prompt.get("prompt"), token_id_list(prompt["prompt_token_ids"]), salt)
        if "prompt" in prompt:
            return Prompt(prompt["prompt"], tokenize(prompt["prompt"]), salt)
        raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        return Prompt(prompt, tokenize(prompt), None)
    if isinstance(prompt, (list, tuple)) or (hasattr(prompt, "tolist") and hasattr(prompt, "ndim")):
        return Prompt(None, token_id_list(prompt), None)
    raise ValueError(f"prompt: expected str, dict or list of token ids, got {type(prompt).__name__}")
