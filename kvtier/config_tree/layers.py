"""The four sources of a setting, each turned into a layer {key path: Setting}.

Precedence is the order the layers are merged in (resolve.py): defaults < file < env <
flags (or keyword arguments, for `LLM(**kwargs)`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Mapping

from kvtier.config_tree.file_source import ConfigFile
from kvtier.config_tree.keys import ALL_SECTIONS, ENV_PREFIX, MISSING, Key, Source, check_value, value_from_text


@dataclass(frozen=True)
class Setting:
    value: object
    source: Source


Layer = dict[str, Setting]


def defaults_layer(keys: list[Key], overrides: Mapping[str, object] | None = None) -> Layer:
    layer = {k.path: Setting(k.default, Source("default")) for k in keys if k.default is not MISSING}
    for path, value in (overrides or {}).items():
        layer[path] = Setting(value, Source("default"))
    return layer


def file_layer(keys: list[Key], config: ConfigFile,
               top_level: Callable[[ConfigFile], Layer] | None = None) -> Layer:
    """Every key of the file, typed; unknown sections and keys are errors naming file:line.

    `top_level` turns keys outside any section (LMCache-style ones) into settings; without
    it such keys are unknown.
    """
    by_path = {k.path: k for k in keys}
    sections = {k.section for k in keys}
    layer: Layer = {}
    for section, entries in config.sections.items():
        if section in ALL_SECTIONS and section not in sections:
            continue  # another command's section: one file can configure serve and kv-server
        if section not in sections:
            raise ValueError(f"{config.where(config.section_lines[section])}: unknown section {section!r}; "
                             f"sections are {', '.join(ALL_SECTIONS)}")
        for name, entry in entries.items():
            key = by_path.get(f"{section}.{name}")
            source = Source("file", config.where(entry.line))
            if key is None:
                raise ValueError(f"{section}.{name}: unknown key (from {source}); "
                                 f"`kvtier config show` lists the keys")
            layer[key.path] = Setting(check_value(key, entry.value, source), source)
    if config.top_level:
        if top_level is None:
            name, entry = next(iter(config.top_level.items()))
            raise ValueError(f"{name}: unknown key (from file {config.where(entry.line)}); "
                             f"keys belong in sections ({', '.join(sorted(sections))})")
        for path, setting in top_level(config).items():
            if path in layer:
                raise ValueError(f"{path}: set twice in {config.path} (at {layer[path].source} "
                                 f"and by {setting.source})")
            layer[path] = setting
    return layer


def env_layer(keys: list[Key], environ: Mapping[str, str], aliases: Mapping[str, str] | None = None,
              reserved: frozenset[str] = frozenset()) -> Layer:
    """KVTIER_<SECTION>_<KEY> for every key of this tree.

    A variable naming one of this tree's sections but no key of it is an error (a typo would
    otherwise be ignored), unless it is `reserved` (used by kvtier for something else);
    variables of other sections are left alone. `aliases` maps extra names to key paths.
    """
    by_env = {k.env: k for k in keys}
    by_path = {k.path: k for k in keys}
    for name, path in (aliases or {}).items():
        by_env.setdefault(name, by_path[path])
    prefixes = sorted({f"{ENV_PREFIX}{k.section.upper()}_" for k in keys}, key=len, reverse=True)
    layer: Layer = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in reserved:
            continue
        key = by_env.get(name)
        if key is None:
            if any(name.startswith(p) for p in prefixes):
                raise ValueError(f"{name}: no such configuration key; `kvtier config show` lists the "
                                 f"keys (variables are KVTIER_<SECTION>_<KEY>)")
            continue
        source = Source("env", name)
        if key.path in layer:  # an alias and the canonical name both set: the canonical one wins
            if name != key.env:
                continue
        layer[key.path] = Setting(value_from_text(key, environ[name], source), source)
    return layer


def flags_layer(keys: list[Key], args: argparse.Namespace) -> Layer:
    """The flags given on the command line (flags are added with default=SUPPRESS, so an
    attribute exists only when the flag was given)."""
    layer: Layer = {}
    for key in keys:
        if not hasattr(args, key.name):
            continue
        raw = getattr(args, key.name)
        if raw is None:  # a flag a subcommand added itself, with default None: not given
            continue
        source = Source("flag", key.flag)
        if isinstance(raw, str):
            value = value_from_text(key, raw, source)
        elif isinstance(raw, list) and key.kind == "float_list":
            value = value_from_text(key, ",".join(raw), source)
        else:
            value = check_value(key, raw, source)
        layer[key.path] = Setting(value, source)
    return layer


def kwargs_layer(keys: list[Key], kwargs: Mapping[str, object]) -> Layer:
    """Keyword arguments (`LLM(model, **kwargs)`), passed through as given: the dataclass
    validates them, and Python callers may pass richer objects (a torch.dtype)."""
    by_name = {k.name: k for k in keys}
    unknown = sorted(set(kwargs) - set(by_name))
    if unknown:
        raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
    return {by_name[n].path: Setting(v, Source("kwarg", n)) for n, v in kwargs.items()}
