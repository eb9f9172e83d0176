"""argparse flags derived from keys: field name -> --field-name, help from field metadata.

Every flag defaults to SUPPRESS, so the parsed namespace holds only the flags the user gave;
defaults come from the tree (layers.py), never from argparse.
"""
from __future__ import annotations

import argparse

from kvtier.config_tree.keys import MISSING, Key

_METAVARS = {"int": "N", "float": "X", "size": "SIZE", "list": "SPEC", "float_list": "X,X,...",
             "dict": "JSON", "str": "TEXT", "any": "VALUE"}


def _help(key: Key) -> str:
    default = "" if key.default in (MISSING, None) else f" (default: {key.default})"
    return f"{key.help or key.path}{default} [{key.path}, env {key.env}]"


def add_key_flags(parser: argparse.ArgumentParser, keys: list[Key], title: str | None = None) -> None:
    """Add one flag per key, grouped under `title` (or one group per section)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key in keys:
        if key.flag in parser._option_string_actions:
            continue  # added by hand already (a subcommand's own flag); that one is used
        name = title or key.section
        group = groups.get(name) or groups.setdefault(name, parser.add_argument_group(name))
        common = dict(dest=key.name, default=argparse.SUPPRESS, help=_help(key))
        if key.kind == "bool":
            group.add_argument(key.flag, *key.flag_aliases, action=argparse.BooleanOptionalAction, **common)
            if key.off_flag:
                group.add_argument(key.off_flag, dest=key.name, action="store_false", default=argparse.SUPPRESS,
                                   help=f"same as --no-{key.flag[2:]}")
            continue
        group.add_argument(key.flag, *key.flag_aliases, action="append" if key.repeatable else "store",
                           choices=key.choices, metavar=None if key.choices else key.metavar or _METAVARS[key.kind],
                           **common)
