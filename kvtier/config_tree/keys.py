"""One configuration key: its place in the tree, its flag and environment spellings, and how
text (from a flag or a variable) or a parsed file value becomes a typed value.

Keys are derived from dataclass fields, so a field added to a config dataclass gets a flag,
an environment variable and a file key without anyone editing a parser.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass

from kvtier.sizes import parse_size

ENV_PREFIX = "KVTIER_"
# Every section of every kvtier command, so a file (or environment) shared by `kvtier serve`
# and `kvtier kv-server` passes each the sections it does not use without complaint.
ALL_SECTIONS = ("engine", "scheduler", "cache", "tiers", "connector", "parking", "metrics", "events", "server",
                "kv_server", "logging")
MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Source:
    """Where a value came from: default, file (with line), env (variable), flag or kwarg."""

    kind: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.where}" if self.where else self.kind


@dataclass(frozen=True)
class Key:
    section: str
    name: str  # the dataclass field (and argparse dest)
    kind: str  # int, float, bool, str, size, list, float_list, dict, any
    optional: bool
    default: object = MISSING
    help: str = ""
    flag: str = ""
    flag_aliases: tuple[str, ...] = ()
    off_flag: str = ""  # an extra flag that sets a bool key to False (kept for old spellings)
    repeatable: bool = False  # list keys whose flag is given once per item
    choices: tuple | None = None
    metavar: str | None = None

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"


_SIMPLE = {int: "int", float: "float", bool: "bool", str: "str", dict: "dict"}


def _kind_of(hint, size: bool) -> tuple[str, bool]:
    """(kind, optional) from a type hint; a union with str (str | torch.dtype) reads as str."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    args = tuple(a for a in args if a is not type(None))
    if size:
        return "size", optional
    if len(args) > 1:
        return ("str" if str in args else "any"), optional
    (hint,) = args
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        inner = typing.get_args(hint)
        return ("float_list" if inner and inner[0] is float else "list"), optional
    return _SIMPLE.get(origin, "any"), optional


def keys_from_dataclass(cls, section_of, extra_meta=None) -> list[Key]:
    """Keys for every init field of `cls`; `section_of(field)` names the field's section.

    Field metadata may carry: help, size (bytes written as 4GiB), flag, flag_aliases,
    off_flag, repeatable, choices, metavar; `extra_meta` ({field: {...}}) supplies the same
    from outside the class (a field's own metadata wins).
    """
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = {**(extra_meta or {}).get(f.name, {}), **f.metadata}
        kind, optional = _kind_of(hints[f.name], bool(meta.get("size")))
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        keys.append(Key(
            section=section_of(f), name=f.name, kind=kind, optional=optional or default is None,
            default=default, help=meta.get("help", ""),
            flag=meta.get("flag", "--" + f.name.replace("_", "-")),
            flag_aliases=tuple(meta.get("flag_aliases", ())), off_flag=meta.get("off_flag", ""),
            repeatable=bool(meta.get("repeatable")), choices=meta.get("choices"), metavar=meta.get("metavar")))
    return keys


def _fail(key: Key, source: Source, problem: str):
    raise ValueError(f"{key.path}: {problem} (from {source})")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def value_from_text(key: Key, text: str, source: Source):
    """A flag's or variable's text as the key's type; `none` clears an optional key."""
    if key.optional and text.strip().lower() in ("none", "null"):
        return None
    try:
        if key.kind == "int":
            return int(text)
        if key.kind == "float":
            return float(text)
        if key.kind == "bool":
            low = text.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            return low in _TRUE
        if key.kind == "size":
            return parse_size(text, key.path)
        if key.kind in ("list", "float_list"):
            items = json.loads(text) if text.lstrip().startswith("[") else [
                part.strip() for part in text.split(",") if part.strip()]
            if key.kind == "float_list":
                items = [float(i) if isinstance(i, str) else i for i in items]
            return check_value(key, items, source)
        if key.kind == "dict":
            return check_value(key, json.loads(text), source)
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        detail = str(e) if key.kind == "size" and str(e) else f"expected {_EXPECTED[key.kind]}, got {text!r}"
        _fail(key, source, detail.removeprefix(f"{key.path}: "))
    return _choose(key, text, source)


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "size": "a size such as 4GiB",
             "list": "a list (JSON or comma-separated)", "float_list": "a list of numbers",
             "dict": "a JSON object", "str": "a string", "any": "a value"}


def _choose(key: Key, value, source: Source):
    if key.choices and value not in key.choices:
        _fail(key, source, f"unknown {value!r}; choose one of {', '.join(map(str, key.choices))}")
    return value


def check_value(key: Key, value, source: Source):
    """A parsed file (or JSON) value checked against the key's type; sizes are parsed."""
    if value is None:
        if key.optional:
            return None
        _fail(key, source, f"must be {_EXPECTED[key.kind]}, not null")
    kind = key.kind
    if kind == "size":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            _fail(key, source, f"expected {_EXPECTED[kind]}, got {value!r}")
        try:
            return parse_size(value, key.path)
        except ValueError as e:
            _fail(key, source, str(e).removeprefix(f"{key.path}: "))
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "dict": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "float_list": lambda v: isinstance(v, list) and all(
            isinstance(i, (int, float)) and not isinstance(i, bool) for i in v),
        "any": lambda v: True,
    }[kind]
    if not ok(value):
        _fail(key, source, f"expected {_EXPECTED[kind]}, got {value!r}")
    if kind == "float":
        value = float(value)
    return _choose(key, value, source)
