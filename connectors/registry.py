"""Find a connector class by name: built-ins, the `kvtier.connectors` entry-point group,
or a `package.module:Class` path."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from kvtier.connectors.base import KVConnector

ENTRY_POINT_GROUP = "kvtier.connectors"
_BUILTINS = {
    "tiered": "kvtier.connectors.tiered:TieredConnector",
    "multi": "kvtier.connectors.multi:MultiConnector",
}


def _load_path(path: str, name: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"kv_connector: cannot import {module_name!r} for {name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"kv_connector: {module_name!r} has no attribute {attr!r}") from None


def get_connector_class(name: str) -> type[KVConnector]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"kv_connector: expected a name or 'package.module:Class', got {name!r}")
    if name in _BUILTINS:
        cls = _load_path(_BUILTINS[name], name)
    elif ":" in name:
        cls = _load_path(name, name)
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            known = sorted(set(_BUILTINS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
            raise ValueError(f"kv_connector: unknown {name!r}; known: {', '.join(known)} or 'package.module:Class'")
        cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, KVConnector)):
        raise ValueError(f"kv_connector: {name!r} is not a KVConnector subclass")
    return cls


def build_connector(name: str, config: dict | None, context) -> KVConnector:
    if config is not None and not isinstance(config, dict):
        raise ValueError("kv_connector_config: must be a dict")
    return get_connector_class(name)(config or {}, context)
