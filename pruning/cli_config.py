"""``--config FILE.toml``: any flag of a subcommand from a TOML file (stdlib ``tomllib``).

Keys are the command's long flags without the leading dashes (``finetune-epochs`` or
``finetune_epochs``), at the top level of the file; values have the flag's type (a string for
paths and choices, ``true`` / ``false`` for switches). Flags given on the command line override
the file; the file overrides the parser's defaults. Unknown keys, wrong types and values outside
a flag's choices are one-line ``PruningError``s naming the file and key. Relative paths in the
file are taken relative to the working directory, as on the command line.

How it works without reparsing: ``enable_config`` replaces every default by the sentinel
``UNSET`` (so a flag the user gave is told apart from a default) and turns ``required`` off;
``resolve_config`` then fills each ``UNSET`` from the file, else from the real default, and
reports required flags given nowhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path

from pruning.errors import PruningError


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    """What ``resolve_config`` needs to know about a parser: its flags by key, real defaults,
    and which flags are required."""

    command: str
    actions: dict[str, argparse.Action]  # key (dest with "-") -> action
    defaults: dict[str, object]  # dest -> the parser's own default
    required: tuple[str, ...]  # dests


def enable_config(parser: argparse.ArgumentParser, command: str) -> ConfigSpec:
    """Add ``--config FILE.toml`` to ``parser`` (call after every other ``add_argument``)."""
    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="read flags from a TOML file (keys: the long flags without "
                             "'--'); flags on the command line override it")
    actions, defaults, required = {}, {}, []
    for action in parser._actions:  # argparse has no public list of actions
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        actions[action.dest.replace("_", "-")] = action
        defaults[action.dest] = action.default
        action.shown_default = action.default   # what --help shows (verifier.cli.HelpFormatter)
        action.default = UNSET
        if action.required:
            required.append(action.dest)
            action.required = False
    return ConfigSpec(command, actions, defaults, tuple(required))


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _convert(path: Path, key: str, value: object, action: argparse.Action) -> object:
    """The TOML ``value`` as the flag ``action`` would have stored it."""
    where = f"{path}: key {key!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise PruningError(f"{where} must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(value, (bool, list, dict)) or value is None:
        raise PruningError(f"{where} must be a single {getattr(action.type, '__name__', 'str')}"
                           f" value, got {value!r}")
    if action.type is float and isinstance(value, int):
        value = float(value)
    if action.type is int and isinstance(value, float):
        raise PruningError(f"{where} must be an integer, got {value!r}")
    try:
        converted = action.type(str(value)) if action.type is not None else str(value)
    except (TypeError, ValueError) as err:
        raise PruningError(f"{where}: {err}") from None
    if action.choices is not None and converted not in action.choices:
        raise PruningError(f"{where}: {converted!r} is not one of "
                           f"{', '.join(map(str, action.choices))}")
    return converted


def read_config(path: Path, spec: ConfigSpec) -> dict[str, object]:
    """dest -> value for every key of the TOML file at ``path``."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PruningError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PruningError(f"{path} is not a readable TOML file: {err}") from None
    values = {}
    for key, value in table.items():
        action = spec.actions.get(key.replace("_", "-"))
        if action is None:
            raise PruningError(f"{path}: unknown key {key!r} for `certiprune {spec.command}` "
                               f"(known: {', '.join(sorted(spec.actions))})")
        values[action.dest] = _convert(path, key, value, action)
    return values


def resolve_config(args: argparse.Namespace, spec: ConfigSpec) -> argparse.Namespace:
    """Fill every flag not given on the command line from ``args.config``, else its default."""
    from_file = read_config(args.config, spec) if getattr(args, "config", None) else {}
    for dest, default in spec.defaults.items():
        if getattr(args, dest, UNSET) is UNSET:
            action = spec.actions[dest.replace("_", "-")]
            if isinstance(default, str) and action.type is not None:
                default = action.type(default)  # as argparse converts string defaults
            setattr(args, dest, from_file.get(dest, default))
    missing = [_flag(spec.actions[dest.replace("_", "-")]) for dest in spec.required
               if getattr(args, dest) is None]
    if missing:
        raise PruningError(f"{', '.join(missing)} required (on the command line or in "
                           "--config)")
    return args
