"""`kvtier config show`: the resolved tree as YAML, each value followed by its source."""
from __future__ import annotations

import json

from kvtier.config_tree.resolve import Resolved


def _render(value) -> str:
    if isinstance(value, str) and value and value.strip() == value and not any(c in value for c in ":#{}[],&*!|>'\"%@`"):
        return value
    return json.dumps(value)  # JSON is YAML: the output reads back as a config file


def render_tree(resolved: Resolved) -> str:
    lines = []
    for section in resolved.sections():
        lines.append(f"{section}:")
        rows = [(k.name, resolved.values[k.path], resolved.sources[k.path])
                for k in resolved.keys if k.section == section and k.path in resolved.values]
        unset = [k.name for k in resolved.keys if k.section == section and k.path not in resolved.values]
        width = max((len(f"{n}: {_render(v)}") for n, v, _ in rows), default=0)
        for name, value, source in rows:
            lines.append(f"  {f'{name}: {_render(value)}':<{width}}  # {source}")
        for name in unset:
            lines.append(f"  # {name}: (required, not set)")
    return "\n".join(lines) + "\n"
