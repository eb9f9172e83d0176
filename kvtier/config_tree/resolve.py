"""Merging layers into one resolved tree, and building validated dataclasses from it."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.config_tree.keys import MISSING, Key, Source
from kvtier.config_tree.layers import Layer


@dataclass
class Resolved:
    """Every key's final value and where it came from (a key with no value is absent)."""

    keys: list[Key]
    values: dict[str, object] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)

    def get(self, path: str, default=None):
        return self.values.get(path, default)

    def section(self, name: str) -> dict[str, object]:
        return {k.name: self.values[k.path] for k in self.keys if k.section == name and k.path in self.values}

    def sections(self) -> list[str]:
        return list(dict.fromkeys(k.section for k in self.keys))


def merge(keys: list[Key], layers: list[Layer]) -> Resolved:
    """Layers from lowest to highest precedence; a later layer's setting wins."""
    resolved = Resolved(keys)
    for layer in layers:
        for path, setting in layer.items():
            resolved.values[path] = setting.value
            resolved.sources[path] = setting.source
    return resolved


def build(cls, resolved: Resolved, keys: list[Key], **extra):
    """`cls(**values of keys)`; a ValueError from its validation is re-raised naming the key's
    path and the source of its value (validators name the field first: "block_size: ...")."""
    kwargs = dict(extra)
    for key in keys:
        if key.name in kwargs:
            continue
        if key.path not in resolved.values:
            if key.default is MISSING:
                raise ValueError(f"{key.path}: required; set {key.flag}, {key.env} or "
                                 f"`{key.section}: {{{key.name}: ...}}` in --config")
            continue
        kwargs[key.name] = resolved.values[key.path]
    try:
        return cls(**kwargs)
    except ValueError as e:
        name, sep, rest = str(e).partition(":")
        key = next((k for k in keys if k.name == name.strip()), None)
        if not sep or key is None or key.path not in resolved.sources:
            raise
        raise ValueError(f"{key.path}:{rest} (from {resolved.sources[key.path]})") from None
