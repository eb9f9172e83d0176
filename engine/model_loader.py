"""Build a model from a Hugging Face directory, and fingerprint its weights cheaply.

Weights come from `*.safetensors` only (no pickle). A sharded checkpoint is read through its
`model.safetensors.index.json`, so stray files such as Mistral's `consolidated.safetensors`
(same weights, other names) are never mixed in.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import struct
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from kvtier.engine.model_config import ModelArchConfig, load_model_config
from kvtier.engine.models import get_model_class

_INDEX = "model.safetensors.index.json"
_SAMPLES = 16  # data samples per file for the fingerprint
_SAMPLE_BYTES = 64 * 1024


def safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory, in a stable (sorted) order."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: model directory not found")
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [os.path.join(path, n) for n in names]
        for f in files:
            if not os.path.isfile(f):
                raise ValueError(f"{f}: listed in {index} but missing")
        return files
    files = sorted(glob.glob(os.path.join(path, "model*.safetensors"))) or sorted(
        glob.glob(os.path.join(path, "*.safetensors"))
    )
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights found in the model directory")
    return files


@contextlib.contextmanager
def _default_dtype_and_device(dtype: torch.dtype, device: torch.device):
    """Create parameters directly in the target dtype and on the target device."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def load_model(path: str, dtype: torch.dtype, device: torch.device | str,
               progress: bool = True) -> tuple[torch.nn.Module, ModelArchConfig]:
    """Parse the config, build the model in `dtype` on `device`, load every weight tensor.
    `progress`: a bytes-loaded bar on stderr, only on a terminal and only for loads that take
    over half a second (tiny test models print nothing)."""
    cfg = load_model_config(path)
    files = safetensors_files(path)
    device = torch.device(device)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: {dtype} is not a floating point type")
    with _default_dtype_and_device(dtype, device):
        model = get_model_class(cfg.architecture)(cfg)

    state = {"file": None, "done": False}
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), desc="loading weights", unit="B", unit_scale=True,
               leave=False, delay=0.5, disable=None if progress else True)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        loaded = 0
        for f in files:
            state["file"] = f
            try:
                handle = safe_open(f, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise ValueError(f"cannot read weights ({e})") from None
            with handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor
            loaded += os.path.getsize(f)
            bar.update(loaded - bar.n)  # count the file's header too, so the bar ends at 100%
        state["done"] = True

    try:
        model.load_weights(tensors())
    except ValueError as e:
        # Per-tensor errors name the file being read; missing tensors name the directory.
        where = path if state["done"] else state["file"]
        raise ValueError(f"{where}: {e}") from None
    finally:
        bar.close()
    model.eval().requires_grad_(False)
    return model, cfg


def _safetensors_header(f, file: str, size: int) -> bytes:
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{file}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if 8 + n > size:
        raise ValueError(f"{file}: safetensors header length {n} exceeds the file size")
    return raw + f.read(n)


def weights_fingerprint(path: str) -> str:
    """sha256 hex over config.json and, per weight file, its size, header and 16 evenly spaced
    64 KiB data samples: cheap on multi-GB checkpoints, yet different for any two random inits.
    The root of prefix-cache hashes (callers add dtype, layout and block size)."""
    h = hashlib.sha256()
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{config}: not found")
    with open(config, "rb") as f:
        h.update(f.read())
    for file in safetensors_files(path):
        size = os.path.getsize(file)
        h.update(os.path.basename(file).encode() + b"\0" + size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            header = _safetensors_header(f, file, size)
            h.update(header)
            start = len(header)
            data_len = size - start
            if data_len <= _SAMPLES * _SAMPLE_BYTES:
                h.update(f.read())
                continue
            step = (data_len - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(start + i * step)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()
