"""YAML + CLI -> a validated config dataclass, with one-line errors (rlhf.config's parsing).

Precedence: dataclass default < the script's defaults < YAML file < CLI flags. Unknown keys,
wrong types and invalid YAML raise ``ConfigError`` naming the key or the line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import ConfigError

_NONE_WORDS = {"none", "null", "~"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the key."""
    tp, optional = _unwrap_optional(typing.get_type_hints(cls)[key])
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    try:
        if typing.get_origin(tp) is dict:
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, dict):
                raise ValueError(value)
            return parsed
        if typing.get_origin(tp) is list:
            (item_type,) = typing.get_args(tp)
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_scalar(item_type, v) for v in items]
        return _scalar(tp, value)
    except (TypeError, ValueError):
        expected = "a JSON object" if typing.get_origin(tp) is dict else getattr(tp, "__name__", tp)
        raise ConfigError(f"{key} expects {expected}, got {value!r}") from None


def _scalar(tp: Any, value: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(value)
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if tp is float:
        return float(value)
    return str(value)


def _unknown_key_message(cls: type, key: str, where: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see --help for the valid keys"
    return f"unknown config key {key!r} in {where}{hint}"


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {where}: not valid YAML ({problem}); check that line and the one before it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value")
    return data


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (-> one line, exit 2) instead of printing usage."""

    config_cls: type = object

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:") and dataclasses.is_dataclass(self.config_cls):
            flag = message.split(":", 1)[1].split()[0]
            raise ConfigError(_unknown_key_message(self.config_cls, flag.lstrip("-").split("=")[0], "the command line"))
        raise ConfigError(message)


def build_parser(cls: type, defaults: dict[str, Any], prog: str | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.config_cls = cls
    parser.add_argument("--config", help="YAML file of key: value defaults (CLI flags override it).")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        nargs = "+" if typing.get_origin(tp) is list else None
        parser.add_argument(f"--{f.name}", nargs=nargs, default=defaults.get(f.name), help=f.metadata["help"],
                            metavar=f.name.upper())
    return parser


def parse_dataclass(cls: type, argv: list[str] | None = None, script_defaults: dict[str, Any] | None = None,
                    prog: str | None = None, description: str | None = None) -> Any:
    """CLI + YAML -> a validated ``cls``. Raises ConfigError (one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)

    values: dict[str, Any] = {f.name: _default_of(f) for f in dataclasses.fields(cls)}
    values.update(script_defaults or {})
    if known.config:
        for key, value in load_yaml(known.config).items():
            if key not in values:
                raise ConfigError(_unknown_key_message(cls, key, known.config))
            values[key] = _coerce(cls, key, value)

    parser = build_parser(cls, values, prog=prog, description=description)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    for key, value in args.items():
        values[key] = _coerce(cls, key, value)
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(str(exc)) from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def save_config(config: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def changed_settings(previous_file: Path, config: Any) -> list[str]:
    """'key old -> new' for each setting that differs from the config.yaml a run saved before."""
    if not previous_file.is_file():
        return []
    previous = yaml.safe_load(previous_file.read_text()) or {}
    current = config.to_dict()
    return [f"{key} {previous[key]!r} -> {current[key]!r}" for key in current
            if key in previous and previous[key] != current[key] and key != "resume_from_checkpoint"]
