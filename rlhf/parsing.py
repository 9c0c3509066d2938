"""YAML + CLI -> a validated config dataclass, with one-line errors (rlhf.config's parsing).

Precedence: dataclass default < the script's defaults < YAML file (--config, or the script's
documented config without one) < CLI flags. TRL's names for our settings (rlhf.aliases) work in
both; unknown keys, wrong types and invalid YAML raise ``ConfigError`` naming the key or the line.
"""

from __future__ import annotations

import argparse
import dataclasses
import decimal
import json
import re
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from rlhf import aliases
from rlhf.errors import ConfigError

_NONE_WORDS = {"none", "null", "~"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]), True
    return tp, False


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the key."""
    tp, optional = _unwrap_optional(typing.get_type_hints(cls)[key])
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    try:
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # str | dict: a name, or a mapping of names
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
            text = str(value)
            return json.loads(text) if text.lstrip().startswith("{") else text
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
        if typing.get_origin(tp) is dict:
            expected = "a JSON object"
        elif typing.get_origin(tp) is list:
            expected = f"a list of {getattr(typing.get_args(tp)[0], '__name__', 'values')} values"
        else:
            expected = getattr(tp, "__name__", tp)
        hint = trl_fraction_hint(key, value) if cls.__name__ == "RLConfig" else ""
        raise ConfigError(f"{key} expects {expected}, got {value!r}{hint}") from None


def trl_fraction_hint(key: str, value: Any) -> str:
    """TRL (transformers' TrainingArguments) reads save/eval/logging steps below 1 as a fraction of
    the run's steps; here they count RL steps, so such a value gets the conversion."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    if key in ("save_steps", "eval_steps", "logging_steps") and 0 < number < 1:
        return (f" (TRL reads a value below 1 as that fraction of the run's steps; here {key} counts RL steps: "
                f"set it to {number:g} x max_steps, rounded)")
    return ""


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
    if tp in (int, float) and isinstance(value, bool):  # YAML's true would pass as 1
        raise ValueError(value)
    if tp is int:
        if isinstance(value, str):  # "3.0" and "1e3" on the command line, as YAML's 3.0 reads
            try:
                return int(value)
            except ValueError:
                pass
            try:  # exactly: 1e-400 is no integer, though its float is 0.0
                exact = decimal.Decimal(value.strip())
            except decimal.InvalidOperation:
                raise ValueError(value) from None
            if not exact.is_finite() or exact != exact.to_integral_value() or exact.adjusted() > 300:
                raise ValueError(value)
            return int(exact)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if tp is float:
        return float(value)
    return str(value)


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not file.exists():
        raise ConfigError(f"config file not found: {path}")
    try:  # not only a regular file: `--config <(envsubst < ppo.yaml)` passes a pipe
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {where}: not valid YAML ({problem}); check that line and the one before it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value")
    check_key_names(data, f"config file {path}")
    return data


def check_key_names(settings: dict[Any, Any], where: str) -> None:
    """Every key a name (YAML reads `1:`, `null:` and `true:` as a number, None and a bool)."""
    for key in settings:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: every key must be a setting's name, got {key!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (-> one line, exit 2) instead of printing usage."""

    config_cls: type = object

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse reads only -5 and -0.5 as negative numbers (before Python 3.13), so --seed -1e3 and
        # --learning_rate -1e-4 were "expected one argument"; these parsers have no option that
        # looks like a number, so any number's text is a value (and its check says what is wrong)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:") and dataclasses.is_dataclass(self.config_cls):
            words = message.split(":", 1)[1].split()
            flags = [word.lstrip("-").split("=")[0] for word in words if word.startswith("--")] or words[:1]
            fields = {f.name for f in dataclasses.fields(self.config_cls)}
            raise ConfigError(aliases.unknown_keys_message(self.config_cls.__name__, fields, list(dict.fromkeys(flags)),
                                                           "the command line"))
        raise ConfigError(message)


_ALIAS_DEST = "trl:"  # argparse dest of a TRL-named flag, kept apart from the fields


def build_parser(cls: type, defaults: dict[str, Any], prog: str | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False, epilog=aliases.help_epilog(cls.__name__),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.config_cls = cls
    parser.add_argument("--config", help="YAML file of key: value defaults (CLI flags override it).")
    hints = typing.get_type_hints(cls)
    trl_names = aliases.aliases_of(cls.__name__)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata["help"].replace("%", "%%")
        missing = [name for name in trl_names.get(f.name, []) if name not in help_text]
        if missing:
            help_text += f" (TRL: {', '.join(missing)})"
        if tp is bool:  # a bare --flag means true; --flag false still works
            parser.add_argument(f"--{f.name}", nargs="?", const="true", default=defaults.get(f.name),
                                help=help_text, metavar="BOOL")
            continue
        nargs = "*" if typing.get_origin(tp) is list else None  # a bare --reward_funcs: none (an environment pays)
        parser.add_argument(f"--{f.name}", nargs=nargs, default=defaults.get(f.name), help=help_text,
                            metavar=f.name.upper())
    # TRL's names, and TRL's settings read at some values or explained (--trust_remote_code false,
    # --use_vllm true): rlhf.aliases decides on each as it does for a YAML file's
    for name in dict.fromkeys([*aliases.alias_names(cls.__name__), *aliases.explained_names(cls.__name__)]):
        if name in hints:
            continue
        switch = {"nargs": "?", "const": "true"} if name in aliases.SWITCHES else {}
        parser.add_argument(f"--{name}", dest=_ALIAS_DEST + name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            **switch)
    return parser


def _flags_given(argv: list[str]) -> set[str]:
    """The --names on a command line (to tell a flag given from its default)."""
    return {token[2:].split("=", 1)[0] for token in argv if token.startswith("--") and len(token) > 2}


def _apply(cls: type, values: dict[str, Any], origin: dict[str, str], given: dict[str, Any],
           native: set[str], where: str, coerce_native: bool = True) -> None:
    """One source's keys into ``values``: ours as they are (coerced from text unless
    ``coerce_native`` is off: Python values of the API), TRL's through rlhf.aliases."""
    fields = {f.name for f in dataclasses.fields(cls)}
    problems = []  # every one of this source's, in one refusal: a TRL recipe can hold several
    hints = typing.get_type_hints(cls)
    for key in [key for key in given if key in native]:  # in the source's order
        try:
            # the API's Python values as given (a reward callable, a Dataset), but numbers and
            # switches as a file's: save_steps 0.5 is TRL's fraction of the run, not a step count
            scalar = _unwrap_optional(hints[key])[0] in (int, float, bool)
            value = _coerce(cls, key, given[key]) if coerce_native or scalar else given[key]
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if isinstance(value, dict) and key in origin and isinstance(values[key], dict):
            # a mapping an earlier source filled from TRL's names (scale_rewards -> advantage_kwargs): one
            # setting each to the user, so a later --advantage_kwargs adds to it, as TRL's keys would
            value = {**values[key], **value}
        values[key] = value
        origin.pop(key, None)
    try:
        translated, came_from = aliases.translate(cls.__name__, fields, given, {key: values[key] for key in native}, where)
    except ConfigError as exc:
        problems.append(str(exc))
        translated, came_from = {}, {}
    for key, value in translated.items():
        try:
            value = _coerce(cls, key, value)
        except ConfigError as exc:
            problems.append(f"{came_from[key]} (TRL's name for {key}): {exc}")
            continue
        values[key] = {**(values[key] or {}), **value} if isinstance(value, dict) else value
        origin[key] = came_from[key]
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"several problems in {where}: " + "; and ".join(problems))


def _settle(values: dict[str, Any], origin: dict[str, str]) -> None:
    """TRL's epsilon_high is the cap on the ratio itself under loss_type cispo (our cispo's own
    epsilon_high), the upper clip epsilon otherwise (our clip_range_high)."""
    if origin.get("clip_range_high") == "epsilon_high" and values.get("policy_loss") == "cispo":
        given = (values["policy_loss_kwargs"] or {}).get("epsilon_high")
        if given is not None and given != values["clip_range_high"]:  # two caps: neither may win silently
            raise ConfigError(f"epsilon_high {values['clip_range_high']} and policy_loss_kwargs epsilon_high {given} "
                              "both set cispo's cap; give one")
        values["policy_loss_kwargs"] = {"epsilon_high": values["clip_range_high"], **(values["policy_loss_kwargs"] or {})}
        values["clip_range_high"] = None
    elif origin.get("policy_loss") == "loss_type" and values.get("policy_loss") == "cispo" \
            and "epsilon_high" not in (values["policy_loss_kwargs"] or {}):
        # TRL 1.16: epsilon_high = epsilon when unset, and cispo caps the ratio at it (0.2 by default)
        cap = values["clip_range"] if values.get("clip_range") is not None else 0.2
        warnings.warn(f"loss_type cispo without epsilon_high: TRL caps every importance weight at epsilon ({cap}), "
                      "which scales REINFORCE rather than clipping it; ScaleRL/TRL recommend epsilon_high 5.0",
                      stacklevel=2)
        values["policy_loss_kwargs"] = {"epsilon_high": cap, **(values["policy_loss_kwargs"] or {})}


# GRPOConfig's defaults (TRL 1.16) where ours differ: (our key, TRL's name, TRL's default, shown as)
TRL_DEFAULTS_THAT_DIFFER = (("kl_coef", "beta", 0.0, "0.0: no KL term"), ("learning_rate", "learning_rate", 1e-6, "1e-6"),
                            ("lr_scheduler_type", "lr_scheduler_type", "linear", "linear"),
                            ("use_bias_correction_kl", "use_bias_correction_kl", True, "true"))


def _warn_of_trl_defaults(values: dict[str, Any], given: set[str], origin: dict[str, str], stacklevel: int = 3) -> None:
    """A config written in TRL's names (some key translated) that leaves out a setting whose
    default differs from GRPOConfig's trains with ours: said once, listing them, so a TRL recipe
    does not silently run another KL or learning rate."""
    if not origin:
        return
    differ = [f"{trl_name} ({'' if key == trl_name else key + ' '}{values[key]!r} here, TRL's default {shown})"
              for key, trl_name, trl_default, shown in TRL_DEFAULTS_THAT_DIFFER
              if key in values and key not in given and values[key] != trl_default
              and (key != "use_bias_correction_kl" or (values.get("kl_coef") and not values.get("kl_in_reward")))]
    if differ:
        warnings.warn(f"this config uses TRL's names but leaves out settings whose defaults here are not GRPOConfig's: "
                      f"{'; '.join(differ)}; set them to train as TRL would", stacklevel=stacklevel)
    other_meaning = [meaning(values) for key, meaning in TRL_NAMES_OF_ANOTHER_MEANING.items() if key in given]
    if other_meaning:
        warnings.warn(f"this config uses TRL's names, and some of its keys mean something else here: "
                      f"{'; '.join(other_meaning)}", stacklevel=stacklevel)


def _optimizer_steps_per_rl_step(values: dict[str, Any]) -> str:
    try:
        steps = values["ppo_epochs"] * values["rollout_batch_size"] * values["num_generations"] / values["mini_batch_size"]
    except (KeyError, TypeError, ZeroDivisionError):
        return "several"
    return f"{steps:g}"


# Keys a TRL config gives with TRL's meaning, which they do not have here (the run goes on, told).
TRL_NAMES_OF_ANOTHER_MEANING = {
    "max_steps": lambda values: (
        f"max_steps {values.get('max_steps')} counts RL steps (a rollout of rollout_batch_size x num_generations "
        f"completions and {_optimizer_steps_per_rl_step(values)} optimizer steps each with these settings), "
        "TRL's counts optimizer steps"),
    "generation_batch_size": lambda values: (
        f"generation_batch_size {values.get('generation_batch_size')} is how many rows are sampled at once (a memory "
        "chunk; the rollout is rollout_batch_size x num_generations whatever it is), TRL's is the completions per "
        "generation round"),
}


def parse_dataclass(cls: type, argv: list[str] | None = None, script_defaults: dict[str, Any] | None = None,
                    prog: str | None = None, description: str | None = None,
                    default_config: str | Path | None = None) -> Any:
    """CLI + YAML -> a validated ``cls``. ``default_config``: the YAML read when no --config is
    given (a script's documented config). Raises ConfigError (one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)

    values: dict[str, Any] = {f.name: _default_of(f) for f in dataclasses.fields(cls)}
    values.update(script_defaults or {})
    origin: dict[str, str] = {}
    config_file = known.config or (str(default_config) if default_config else None)
    if config_file:
        data = load_yaml(config_file)
        _apply(cls, values, origin, data, {key for key in data if key in values}, config_file)

    parser = build_parser(cls, values, prog=prog, description=description)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    given = _flags_given(argv)
    cli = {key.removeprefix(_ALIAS_DEST): value for key, value in args.items()
           if key.startswith(_ALIAS_DEST) or key in given}
    cli_keys = {key for key in cli if key in values and key in given}
    _apply(cls, values, origin, cli, cli_keys, "the command line")
    _settle(values, origin)
    if hasattr(cls, "complete_settings"):
        # the user's keys (a --config file's, the command line's) stay; the script's defaults and its
        # documented config are its estimator's, and give way where the user chose another estimator
        given = cli_keys | set(origin) | (set(data) if known.config else set())
        documented = data if config_file and not known.config else {}
        documented_estimator = documented.get("advantage_estimator", (script_defaults or {}).get("advantage_estimator"))
        if values.get("advantage_estimator") == documented_estimator:
            given |= set(documented)
        cls.complete_settings(values, given)
    try:
        config = cls(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(str(exc)) from None
    except ConfigError as exc:
        raise ConfigError(in_the_names_given(str(exc), origin, cls)) from None
    if hasattr(cls, "complete_settings"):
        # once the settings are known to be valid: a refused config is its one error line alone
        _warn_of_trl_defaults({key: getattr(config, key) for key in values}, given, origin)
    return config


def in_the_names_given(message: str, origin: dict[str, str], cls: type) -> str:
    """A refusal that starts with our name of a setting the config gave under TRL's name for the
    same setting says TRL's too: ``--num_iterations 0`` is refused as "num_iterations (ppo_epochs
    here) must be >= 1". TRL names translated into another kind of setting (loss_type into
    loss_agg_mode, delta into policy_loss_kwargs) keep our name: the message is about that."""
    key = message.split(" ", 1)[0]
    renames = aliases.ALIASES.get(cls.__name__, ({}, [], {}))[0]
    given = origin.get(key)
    if given is not None and given != key and renames.get(given) == key:
        return f"{given} ({key} here){message[len(key):]}"
    return message


def dataclass_from_dict(cls: type, settings: dict[str, Any], where: str, **complete: Any) -> Any:
    """``cls`` from a mapping in which TRL's names may stand for ours (the Python API's
    ``RLConfig.from_dict``). Our keys keep their Python values as given (a reward callable, a
    Dataset); TRL's are translated as in a YAML file. ``complete``: keywords of the class's
    ``complete_settings``. Raises ConfigError (one line)."""
    check_key_names(settings, where)
    values: dict[str, Any] = {f.name: _default_of(f) for f in dataclasses.fields(cls)}
    origin: dict[str, str] = {}
    native = {key for key in settings if key in values}
    _apply(cls, values, origin, dict(settings), native, where, coerce_native=False)
    _settle(values, origin)
    if hasattr(cls, "complete_settings"):
        cls.complete_settings(values, native | set(origin), **complete)
    try:
        config = cls(**values)
    except ConfigError as exc:
        raise ConfigError(in_the_names_given(str(exc), origin, cls)) from None
    if hasattr(cls, "complete_settings"):  # once valid, as parse_dataclass
        _warn_of_trl_defaults({key: getattr(config, key) for key in values}, native | set(origin), origin,
                              stacklevel=4)  # the caller of from_dict
    return config


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def save_config(config: Any, path: Path) -> None:
    data = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def changed_settings(previous_file: Path, config: Any) -> list[str]:
    """'key old -> new' for each setting that differs from the config.yaml a run saved before."""
    if not previous_file.is_file():
        return []
    try:
        previous = yaml.safe_load(previous_file.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{previous_file}:{mark.line + 1}" if mark is not None else str(previous_file)
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where}: the previous run's config is unreadable ({problem}); fix or delete that "
                          "file (a resumed run takes its settings from --config and the command line)") from None
    if not isinstance(previous, dict):
        raise ConfigError(f"{previous_file}: the previous run's config must be a mapping of key: value, got "
                          f"{type(previous).__name__}; fix or delete that file")
    current = config.to_dict()
    return [f"{key} {previous[key]!r} -> {current[key]!r}" for key in current
            if key in previous and previous[key] != current[key] and key != "resume_from_checkpoint"]
