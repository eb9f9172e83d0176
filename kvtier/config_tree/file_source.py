"""A config file (YAML or JSON) read with the line of every key, so errors can name it.

The file is a mapping of sections to mappings of keys; JSON is read through the YAML parser
(JSON is YAML), which keeps line numbers for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class FileEntry:
    value: object
    line: int  # 1-based


@dataclass
class ConfigFile:
    path: str
    sections: dict[str, dict[str, FileEntry]]  # section -> key -> entry
    top_level: dict[str, FileEntry]  # keys that are not sections (LMCache-style keys, typos)
    section_lines: dict[str, int]

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def load_config_file(path: str) -> ConfigFile:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror or e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ValueError(f"--config: {where}: not valid YAML/JSON ({getattr(e, 'problem', None) or e})") from None
    out = ConfigFile(path, {}, {}, {})
    if root is None:
        return out
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"--config: {path}:{root.start_mark.line + 1}: the file must be a mapping of sections")
    constructor = yaml.SafeLoader(text)  # only used to turn nodes into Python values
    try:
        for key_node, value_node in root.value:
            name = str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                out.section_lines[name] = line
                out.sections[name] = {
                    str(k.value): FileEntry(constructor.construct_object(v, deep=True), k.start_mark.line + 1)
                    for k, v in value_node.value}
            else:
                out.top_level[name] = FileEntry(constructor.construct_object(value_node, deep=True), line)
    finally:
        constructor.dispose()
    return out
