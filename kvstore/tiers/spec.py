"""Tier specs as users write them, parsed once and turned into Tier objects.

    cpu:4GiB
    lmdb:/path/to/dir?size=64GiB&admit=2&codec=fp8
    redis://[user:pass@]host:port/db?ttl=3600   rediss://...   redis+cluster://host:port
    grpc://host1:port,host2:port?token_file=F&tls=1

Each scheme maps to a tier class (imported lazily, so a missing optional dependency only
matters to those who use that tier) with `from_spec(spec, layouts)`: the block layouts of the
KV groups, which a memory tier sizes its slots by and a byte tier ignores.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import torch

from kvtier.sizes import parse_size

_TIER_CLASSES = {
    "cpu": "kvtier.kvstore.tiers.cpu_tier:CpuTier",
    "lmdb": "kvtier.kvstore.tiers.lmdb_tier:LmdbTier",
    "redis": "kvtier.kvstore.tiers.redis_tier:RedisTier",
    "rediss": "kvtier.kvstore.tiers.redis_tier:RedisTier",
    "redis+cluster": "kvtier.kvstore.tiers.redis_tier:RedisTier",
    "grpc": "kvtier.kvstore.tiers.grpc_tier:GrpcTier",
}


@dataclass(frozen=True)
class BlockLayout:
    """What one stored block looks like: the page-first slice of one KV group."""

    shape: tuple[int, ...]  # [num_layers, 2, block_size, kv_heads, head_dim]
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class TierSpec:
    text: str  # as the user wrote it, for messages
    scheme: str
    target: str  # path for lmdb, the whole URL for network tiers, "" for cpu
    size: int | None = None
    options: dict[str, str] = field(default_factory=dict)

    def option(self, name: str, default=None):
        return self.options.get(name, default)

    def check_options(self, known) -> None:
        """Fail fast on an option the tier does not know (a typo must not be ignored)."""
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise ValueError(
                f"tier spec {self.text!r}: unknown option(s) {', '.join(unknown)}; "
                f"{self.scheme} knows size, {', '.join(known)}"
            )

    def size_option(self, name: str, default: int | None = None) -> int | None:
        raw = self.options.get(name)
        return default if raw is None else parse_size(raw, f"tier spec {self.text!r} {name}")

    def seconds_option(self, name: str, default: float | None, allow_zero: bool = False) -> float | None:
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"tier spec {self.text!r}: option {name}={raw!r} is not a number of seconds")
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"tier spec {self.text!r}: option {name} must be {'>=' if allow_zero else '>'} 0")
        return value

    def int_option(self, name: str, default: int | None = None, minimum: int = 0) -> int | None:
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"tier spec {self.text!r}: option {name}={raw!r} is not an integer")
        if value < minimum:
            raise ValueError(f"tier spec {self.text!r}: option {name} must be >= {minimum}")
        return value

    def bool_option(self, name: str, default: bool = False) -> bool:
        raw = self.options.get(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"tier spec {self.text!r}: option {name}={raw!r} is not a boolean")


def parse_tier_spec(text: str) -> TierSpec:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"tier spec: expected a string like 'cpu:4GiB', got {text!r}")
    text = text.strip()
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        rest = text
    elif ":" in text:
        scheme, rest = text.split(":", 1)
        scheme = scheme.lower()
    else:
        raise ValueError(f"tier spec {text!r}: expected SCHEME:..., e.g. cpu:4GiB or lmdb:/path?size=8GiB")
    if scheme not in _TIER_CLASSES:
        raise ValueError(f"tier spec {text!r}: unknown tier {scheme!r}; known: {', '.join(sorted(_TIER_CLASSES))}")
    base, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    size = None
    if scheme == "cpu":
        if not base:
            raise ValueError(f"tier spec {text!r}: the cpu tier needs a size, e.g. cpu:4GiB")
        size = parse_size(base, f"tier spec {text!r}")
        base = ""
    elif scheme == "lmdb" and not base:
        raise ValueError(f"tier spec {text!r}: the lmdb tier needs a directory, e.g. lmdb:/var/cache/kv?size=64GiB")
    if "size" in options:
        size = parse_size(options.pop("size"), f"tier spec {text!r} size")
    return TierSpec(text=text, scheme=scheme, target=base, size=size, options=options)


def build_tier(spec: TierSpec | str, layouts: Sequence[BlockLayout] | BlockLayout):
    """The tier for `spec`, serving blocks of `layouts` (one per KV group; a single
    BlockLayout is accepted for one group)."""
    if isinstance(spec, str):
        spec = parse_tier_spec(spec)
    layouts = (layouts,) if isinstance(layouts, BlockLayout) else tuple(layouts)
    module_name, _, cls_name = _TIER_CLASSES[spec.scheme].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.from_spec(spec, layouts)
