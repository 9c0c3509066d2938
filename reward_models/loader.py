"""Turn ``reward_funcs`` entries into callables and combine them with validated outputs.

Every reward follows TRL's convention ``fn(prompts, completions, **columns) -> list[float]``;
``columns`` carries the dataset's other columns (e.g. ``answer``) for verifiable rewards.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from reward_models.builtins import BUILTIN_REWARDS
from rlhf.errors import RewardError

RewardFn = Callable[..., list[float]]


def load_reward_function(spec: str) -> RewardFn:
    """Resolve one ``reward_funcs`` entry.

    - a built-in name (``sentiment``)
    - ``path/to/file.py:function``  (a file anywhere on disk)
    - ``package.module:function``   (an importable module)
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise RewardError(
            f"unknown reward {spec!r}: use a built-in ({', '.join(BUILTIN_REWARDS)}), "
            "path/to/file.py:function or package.module:function"
        )
    target, _, function_name = spec.rpartition(":")
    if target.endswith(".py"):
        module = _import_file(Path(target), spec)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise RewardError(f"cannot import module {target!r} for reward {spec!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {target} has no function {function_name!r}")
    return fn


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise RewardError(f"reward file not found: {path} (from reward_funcs entry {spec!r})")
    module_name = f"rlhf_user_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardError(f"reward file {path} failed to import: {type(exc).__name__}: {exc}") from None
    return module


def reward_name(spec: str) -> str:
    """Short name for logging: the built-in or function name (``reward/<name>`` in metrics)."""
    return spec.rpartition(":")[2] if ":" in spec else spec


@dataclass
class RewardOutput:
    total: list[float]                      # weighted sum per sample
    components: dict[str, list[float]]     # unweighted values per reward name


class CombinedReward:
    """Weighted sum of several reward functions with every output checked.

    A function that raises, returns the wrong number of values, None, or a non-finite number is
    reported by name together with the offending sample.
    """

    def __init__(self, specs: list[str], weights: list[float] | None = None):
        self.specs = list(specs)
        self.weights = list(weights) if weights is not None else [1.0] * len(specs)
        if len(self.weights) != len(self.specs):
            raise RewardError(f"{len(self.weights)} reward_weights for {len(self.specs)} reward_funcs")
        self.functions = [load_reward_function(spec) for spec in self.specs]
        self.names = self._unique_names()

    def _unique_names(self) -> list[str]:
        names: list[str] = []
        for spec in self.specs:
            name = reward_name(spec)
            if name in names:
                name = f"{name}_{len(names)}"
            names.append(name)
        return names

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> RewardOutput:
        components: dict[str, list[float]] = {}
        for name, spec, fn in zip(self.names, self.specs, self.functions):
            components[name] = self._call_one(spec, fn, prompts, completions, columns)
        total = [
            sum(w * components[name][i] for name, w in zip(self.names, self.weights)) for i in range(len(completions))
        ]
        return RewardOutput(total=total, components=components)

    @staticmethod
    def _call_one(spec: str, fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, Any]) -> list[float]:
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
            if inspect.isawaitable(values):
                raise RewardError(f"reward {spec!r} is async; async rewards are not supported yet — make it a plain def")
            values = list(values)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"reward {spec!r} raised {type(exc).__name__}: {exc}") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {spec!r} returned {len(values)} values for {len(completions)} completions")
        checked = []
        for i, value in enumerate(values):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if value is None or isinstance(value, bool) or not math.isfinite(number):
                raise RewardError(
                    f"reward {spec!r} returned {value!r} for sample {i} (completion {completions[i][:50]!r}); "
                    "rewards must be finite numbers"
                )
            checked.append(number)
        return checked
