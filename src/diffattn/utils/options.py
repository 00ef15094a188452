"""The options toolkit: typed option dataclasses as command-line flags, one TOML reader, one ``--set`` grammar.

* :func:`opt` declares a dataclass field with its help text; :func:`add_options_to_parser` turns every field
  into a ``--flag`` (lists as ``A,B,...``, booleans as ``--x/--no-x``); :func:`options_from_args` merges
  defaults <- a TOML table <- the explicit flags. The eval tasks, the benchmarks and DEX use them.
* :func:`read_toml` reads a TOML file with one-line errors naming the file.
* ``--set KEY=VALUE`` everywhere: :func:`parse_set` splits it, :func:`parse_value` reads VALUE as a TOML
  scalar (``1e-3``, ``true``, ``"x"``, ``[1, 2]``), else JSON (``null``), else the bare string.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
import types
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import UsageError


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with command-line help (``metadata['help']``)."""
    if isinstance(default, (list, dict)):  # a fresh copy per instance
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def flag(name: str) -> str:
    return name.replace("_", "-")


def _field_kind(tp: Any) -> tuple[Callable[[str], Any] | None, bool, bool]:
    """(scalar parser, is_list, is_bool) for a field's (resolved) annotation."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return args[0], True, False
    if tp is bool:
        return None, False, True
    return (tp if tp in (int, float, str) else str), False, False


def _list_parser(elem: Callable[[str], Any], name: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [elem(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot parse {text!r} as a comma-separated list of "
                                             f"{getattr(elem, '__name__', 'values')}") from None
    return parse


def add_options_to_parser(parser, cls: type, *, skip: Sequence[str] = ("seed",)) -> None:
    """One ``--flag`` per field of the options dataclass ``cls`` (help from :func:`opt`); defaults are
    applied later (argparse default ``None``), so a TOML file can sit between the defaults and the flags.

    Field metadata (keywords of :func:`opt`): ``choices``; ``nargs="+"`` (a list field given as several words
    instead of ``A,B,...``); ``switch=True`` (a bool set by its bare flag, e.g. ``--no-progress``); ``group``
    (the title of the argument group it is listed under); ``parse`` (a function str -> value)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue  # common flags, added by the command; derived fields
        meta = f.metadata
        where = parser
        if meta.get("group"):
            where = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        elem, is_list, is_bool = _field_kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        # a None default means "decided at run time": the help text says how, "(default: None)" would not
        suffix = "" if default is None or meta.get("switch") else f" (default: {shown})"
        help_ = f"{meta.get('help', '')}{suffix}".replace("%", "%%")
        name = "--" + flag(f.name)
        extra = {"choices": meta["choices"]} if meta.get("choices") else {}
        if meta.get("switch"):
            where.add_argument(name, action="store_true", default=None, help=help_)
        elif is_bool:
            where.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif is_list and meta.get("nargs"):
            where.add_argument(name, nargs=meta["nargs"], type=_scalar_parser(elem, f.name), default=None,
                               metavar=meta.get("metavar"), help=help_)
        elif is_list:
            where.add_argument(name, type=_list_parser(elem, f.name), default=None, metavar="A,B,...", help=help_)
        elif meta.get("escapes"):  # "\\n" on the command line means a newline
            where.add_argument(name, type=_unescape, default=None, help=help_.encode("unicode_escape").decode())
        else:
            if meta.get("metavar"):
                extra["metavar"] = meta["metavar"]
            where.add_argument(name, type=meta.get("parse") or _scalar_parser(elem, f.name), default=None,
                               help=help_, **extra)


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _scalar_parser(elem, name):
    def parse(text: str):
        if elem is str:
            return text
        try:
            return elem(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {elem.__name__}") from None
    parse.__name__ = getattr(elem, "__name__", "value")
    return parse


def options_from_args(cls: type, args, config: Mapping[str, Any] | None = None):
    """Defaults <- TOML config <- explicit command-line flags; ``cls.from_mapping`` validates and builds."""
    data: dict[str, Any] = {}
    if config:
        data.update({str(k).replace("-", "_"): v for k, v in config.items()})
    for f in fields(cls):
        value = getattr(args, f.name, None) if f.init else None
        if value is not None:
            data[f.name] = value
    return cls.from_mapping(data, source="options")



def add_actions(parser, dest: str, metavar: str, **kwargs):
    """Sub-actions of a command (``data prepare``, ``adapt dex``, ``eval ppl``, ...): the subparsers object, with
    the command itself printing its help to stderr and exiting 2 when no action is named."""
    actions = parser.add_subparsers(dest=dest, metavar=metavar, **kwargs)

    def no_action(args) -> int:
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(func=no_action)
    return actions


def options_from_mapping(cls: type, data: Mapping[str, Any], source: str = "options",
                         unknown: str = "unknown option(s) {names}; valid: {valid}"):
    """``cls(**data)`` with ``-`` in keys read as ``_``; keys that are not fields raise a UsageError
    ``"<source>: <unknown>"`` (``{names}``: the unknown keys, ``{valid}``: the fields)."""
    known = {f.name for f in fields(cls)}
    norm = {str(k).replace("-", "_"): v for k, v in data.items()}
    bad = sorted(set(norm) - known)
    if bad:
        raise UsageError(f"{source}: " + unknown.format(names=", ".join(bad), valid=", ".join(sorted(known))))
    return cls(**norm)


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file; a missing file, a directory or invalid TOML is one line naming the file."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"config path is a directory, not a TOML file: {p}")
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not valid TOML ({e})") from None


def parse_value(raw: str) -> Any:
    """A ``--set`` value: a TOML scalar (``1e-3``, ``true``, ``"x"``, ``[1, 2]``), else JSON, else the bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_set(item: str, *, example: str = "train.lr=1e-3") -> tuple[str, Any]:
    """``KEY=VALUE`` -> (KEY, value) with :func:`parse_value`; anything else is a ``UsageError``."""
    if "=" not in item:
        raise UsageError(f"--set {item!r}: expected key=value (e.g. {example})")
    key, raw = (s.strip() for s in item.split("=", 1))
    if not key:
        raise UsageError(f"--set {item!r}: empty key")
    return key, parse_value(raw)


def set_dotted(tables: dict[str, Any], key: str, value: Any, *, example: str = "train.lr=1e-3") -> None:
    """Apply one ``--set TABLE.KEY=VALUE`` (tables nest: ``eval.needle.samples``) to parsed TOML, in place."""
    table, _, name = key.rpartition(".")
    if not table or not name:
        raise UsageError(f"--set {key}: use TABLE.KEY (e.g. {example})")
    node = tables
    for part in table.split("."):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {key}: {part!r} is a value, not a table")
    node[name] = value


__all__ = ["OneLineParser", "opt", "flag", "add_options_to_parser", "options_from_args", "options_from_mapping", "add_actions",
           "read_toml", "parse_value", "parse_set", "set_dotted"]


class OneLineParser(argparse.ArgumentParser):
    """argparse errors as one line (no usage block), exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")
