"""Rotary position embedding (RoPE), neox style (`rotate_half`), as Hugging Face Llama does it.

`inv_freq` is computed exactly as transformers computes it (float32 on the CPU, same
expression order), and cos/sin are rebuilt from the positions each step in float32, then
cast to the activations' dtype, so logits match HF bit for bit in float32.
"""
from __future__ import annotations

import math

import torch


def compute_inv_freq(head_dim: int, theta: float, rope_type: str, scaling: dict[str, float]) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies for the `default`, `linear` and `llama3` types."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    raise ValueError(f"rope_type {rope_type!r} is not supported; use default, linear or llama3")


def _llama3(inv_freq: torch.Tensor, s: dict[str, float]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, d] in x's dtype."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, rope_type: str = "default", scaling: dict | None = None):
        super().__init__()
        # A plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies.
        self.inv_freq = compute_inv_freq(head_dim, theta, rope_type, scaling or {})

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, sin), each [T, head_dim] in `dtype`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
