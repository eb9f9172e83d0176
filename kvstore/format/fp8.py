"""The fp8 codec: float8 e4m3 values with one float32 scale per (layer, k/v, head).

Halves the bytes of a bf16 block (a quarter of float32) for disk and network tiers, where
bandwidth is what limits load-instead-of-recompute. Keys and values of one head share a
range that differs a lot between heads and layers (outlier heads), so the scale is taken
per (layer, k/v, head), reducing over block_size and head_dim; one scale per block would
crush the quiet heads into e4m3's subnormals.

Payload: scales (float32, shape [L, 2, H]) then the fp8 bytes in the block's own order.
Blocks of any other rank get one scale for the whole block.

Error bound, per element x of a head whose max |x| is m: e4m3 keeps 3 mantissa bits, so
round-to-nearest is off by at most 2^-4 |x| (normal range) or 2^-10 * m/448 (subnormals),
i.e. never more than 2^-4 * m; decoding to bf16/fp16 adds that dtype's own rounding.
Non-finite inputs come back as NaN (e4m3fn has no infinity); KV caches hold none.
"""
from __future__ import annotations

import torch

from kvtier.kvstore.format.codec import Codec, CorruptBlock, register_codec

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scales, broadcastable against the block."""
    if len(shape) == 5:  # [num_layers, 2, block_size, kv_heads, head_dim]
        return (shape[0], shape[1], 1, shape[3], 1)
    return (1,) * len(shape)


class Fp8Codec(Codec):
    name = "fp8"
    codec_id = 1

    def encode(self, block: torch.Tensor) -> bytes:
        x = block.detach().cpu().float()
        scale_shape = _scale_shape(tuple(x.shape))
        if x.numel() == 0:
            amax = torch.zeros(scale_shape)
        elif x.dim() == 5:
            amax = x.abs().amax(dim=(2, 4), keepdim=True)
        else:
            amax = x.abs().amax().reshape(scale_shape)
        scale = amax / FP8_MAX
        # An all-zero (or empty) head has no range to scale to; any positive scale decodes it.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        # x / scale can land a hair above 448 through rounding; e4m3fn turns that into NaN.
        q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        return b"".join((scale.contiguous().numpy().tobytes(), q.view(torch.uint8).numpy().tobytes()))

    def decode(self, payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        scale_shape = _scale_shape(shape)
        n_scales = torch.Size(scale_shape).numel()
        numel = torch.Size(shape).numel()
        if len(payload) != 4 * n_scales + numel:
            raise CorruptBlock(f"fp8 payload has {len(payload)} bytes, expected {4 * n_scales + numel}")
        scales = torch.frombuffer(payload[: 4 * n_scales], dtype=torch.float32).view(scale_shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        q = torch.frombuffer(payload[4 * n_scales :], dtype=torch.uint8).view(FP8).view(shape)
        return (q.float() * scales).to(dtype)


register_codec(Fp8Codec)
