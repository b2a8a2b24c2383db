"""Command-line options from the options dataclasses: one place for each default and help text.

A dataclass field becomes `--field-name` (underscores as dashes) with the field's default, its type
from the annotation and the help given with `option(...)`:
    str / int / float            --name VALUE
    X | None                     --name VALUE, default None
    bool                         --name / --no-name
    bool | None                  --name / --no-name, default None ("decide for me")
    tuple[str, ...]              --name VALUE, repeatable (positional: one or more values)
    const=C                      --name [VALUE]: the flag alone gives C
    parse=f                      --name VALUE, VALUE converted by f (raising argparse.ArgumentTypeError)
A field without a default is required (positional with `positional=True`); `cli=False` keeps a
field off the command line (set from Python only); `flag` and `short` rename it there. --help shows
each default (help_with_default): a help text that says "default" itself (for a None, what it means)
is left as written.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option(default=dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,  # noqa: A002
           short: str | None = None, positional: bool = False, cli: bool = True, choices=None,
           metavar: str | None = None, default_factory=dataclasses.MISSING, parse=None, const=None):
    """A dataclass field with its command-line help (and optional flag name, short flag, choices,
    a function parsing the flag's text, the value of the flag given without one: const)."""
    metadata = {"help": help, "flag": flag, "short": short, "positional": positional, "cli": cli,
                "choices": choices, "metavar": metavar, "parse": parse, "const": const}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


INCLUDE_HELP = ("read only the corpus files matching GLOB (path relative to the corpus folder; a pattern without '/' "
                "also matches the file name); repeatable")
EXCLUDE_HELP = "leave out the files matching GLOB; repeatable"


def _unwrap_optional(hint) -> tuple[object, bool]:
    """(X, True) for X | None, (hint, False) otherwise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def help_with_default(help: str | None, default, flag: str) -> str | None:  # noqa: A002
    """The help text with "(default: ...)" appended, unless it already says "default" (a default of
    None, which means something else per option, must say so itself): --FLAG or --no-FLAG for a
    bool, "none" for an empty repeatable flag."""
    if help is None or "default" in help or default is None:
        return help
    if isinstance(default, bool):
        shown = flag if default else "--no-" + flag[2:]
    elif isinstance(default, tuple):
        shown = " ".join(map(str, default)) or "none"
    else:
        shown = str(default)
    return f"{help} (default: {shown})".replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Adds an argument for every command-line field of the dataclass cls (see the module doc)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if f.name in skip or not md.get("cli", True):
            continue
        hint, optional = _unwrap_optional(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        flag = "--" + (md.get("flag") or f.name.replace("_", "-"))
        kwargs: dict = {"help": md.get("help") if required else help_with_default(md.get("help"), f.default, flag),
                        "dest": f.name}
        for key in ("choices", "metavar"):
            if md.get(key) is not None:
                kwargs[key] = md[key]
        if md.get("positional"):
            many = {"nargs": "+"} if typing.get_origin(hint) is tuple else {}
            parser.add_argument(f.name, help=md.get("help"), **many)
            continue
        if md.get("parse") is not None:
            kwargs.update(type=md["parse"], default=None if required else f.default, required=required)
        elif hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None if optional else f.default)
        elif typing.get_origin(hint) is tuple:
            kwargs.update(action="append", default=None)
        else:
            kwargs.update(type=hint, default=None if required else f.default, required=required)
        if md.get("const") is not None:
            kwargs.update(nargs="?", const=md["const"])
        if md.get("flag") and "metavar" not in kwargs and "action" not in kwargs:
            kwargs["metavar"] = md["flag"].upper().replace("-", "_")
        names = [md.get("short")] if md.get("short") else []
        names.append(flag)
        parser.add_argument(*names, **kwargs)


def options_from_args(cls, args: argparse.Namespace, **extra):
    """cls built from the parsed command-line fields (tuples from repeated flags), plus extra."""
    values = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        hint, optional = _unwrap_optional(typing.get_type_hints(cls)[f.name])
        if isinstance(value, list):
            value = tuple(value)
        elif value is None and not optional and typing.get_origin(hint) is tuple:
            value = ()
        values[f.name] = value
    return cls(**{**values, **extra})
