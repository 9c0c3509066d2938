"""Turn ``reward_funcs`` entries into callables and combine them with validated outputs.

Every reward follows TRL's convention ``fn(prompts, completions, **columns) -> list[float]``;
``columns`` carries the dataset's other columns (e.g. ``answer``) for verifiable rewards.

Process (per-token) rewards: instead of a number, a sample's value may be a list of
``(char_position, reward)`` pairs. Each reward lands on the completion token that holds character
``char_position`` of the completion string (0-based; positions at or past the end land on the
last token), adds to the outcome rewards of the other functions, and flows through GAE and
reward-to-go like any per-token reward. An empty list = no reward for that sample.

Kinds of entry:
    sentiment, length, format, ...     a built-in (reward_models.builtins), configured by reward_kwargs
    path/to/file.py:function           a function in a file; ``async def`` works too
    package.module:function            an importable function
    path/to/model_dir or org/model     a learned reward model (sequence classification, 1 logit)
    http(s)://host:port/path           a remote reward endpoint (see reward_models.remote)
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reward_models.builtins import BUILTIN_REWARDS
from rlhf.errors import RewardError

RewardFn = Callable[..., Any]


def load_reward_function(spec: str, kwargs: dict[str, Any] | None = None, device: Any = None) -> RewardFn:
    """Resolve one ``reward_funcs`` entry; ``kwargs`` are its ``reward_kwargs``."""
    kwargs = dict(kwargs or {})
    if spec in BUILTIN_REWARDS:
        try:
            return BUILTIN_REWARDS[spec](**kwargs)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward_kwargs for {spec!r}: {exc}") from None
    if spec.startswith(("http://", "https://")):
        from reward_models.remote import RemoteReward

        return RemoteReward(spec, **kwargs)
    if ":" in spec:
        fn = _load_user_function(spec)
        if kwargs:  # user functions receive their reward_kwargs as extra keyword arguments
            return _with_kwargs(fn, kwargs)
        return fn
    if Path(spec).is_dir() or (spec.count("/") == 1 and not Path(spec).exists()):
        from reward_models.learned import LearnedReward

        return LearnedReward(spec, device=device, **kwargs)
    raise RewardError(
        f"unknown reward {spec!r}: use a built-in ({', '.join(BUILTIN_REWARDS)}), path/to/file.py:function, "
        "package.module:function, a reward-model dir, or an http(s):// URL"
    )


def _with_kwargs(fn: RewardFn, extra: dict[str, Any]) -> RewardFn:
    if inspect.iscoroutinefunction(fn):
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **{**extra, **kwargs})
        call_async.__name__ = fn.__name__
        return call_async

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{**extra, **kwargs})
    call.__name__ = fn.__name__
    return call


def _load_user_function(spec: str) -> RewardFn:
    target, _, function_name = spec.rpartition(":")
    if target.endswith(".py"):
        module = _import_file(Path(target), spec)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise RewardError(f"cannot import module {target!r} for reward {spec!r}: {_describe(exc)}") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {target} has no function {function_name!r}")
    return fn


def _describe(exc: BaseException) -> str:
    """The exception plus the user's line that raised it (the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f" at {Path(exc.filename or '?').name}:{exc.lineno}"
    return f"{type(exc).__name__}: {exc}{where}"


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise RewardError(f"reward file not found: {path} (from reward_funcs entry {spec!r})")
    module_name = "rlhf_user_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if module_name in sys.modules:  # several functions of one file share one module (and its state)
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardError(f"reward file {path} failed to import: {_describe(exc)}") from None
    return module


def _single_sample(call_kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """The keyword arguments of a reward call cut down to sample ``index`` (per-sample lists only)."""
    count = len(call_kwargs["completions"])
    return {k: (v[index:index + 1] if isinstance(v, list) and len(v) == count else v) for k, v in call_kwargs.items()}


def _failing_sample(fn: RewardFn, call_kwargs: dict[str, Any]) -> str:
    """Re-run a failed batch one sample at a time to tell the user which sample breaks it."""
    for i in range(len(call_kwargs["completions"])):
        try:
            fn(**_single_sample(call_kwargs, i))
        except Exception:
            return f" on sample {i} (completion {call_kwargs['completions'][i][:50]!r})"
    return ""


Steps = list[tuple[int, float]]  # process rewards of one sample: (char_position, reward)


def _as_reward(value: Any) -> float | Steps:
    """A sample's value as a finite number or as process rewards; ValueError otherwise."""
    if isinstance(value, (list, tuple)):
        steps = []
        for item in value:
            try:
                position, reward = item
            except (TypeError, ValueError):
                raise ValueError(item) from None
            if isinstance(position, bool) or not isinstance(position, numbers.Integral) or position < 0:
                raise ValueError(item)
            steps.append((int(position), _finite(reward)))
        return steps
    return _finite(value)


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(value) from None
    if value is None or isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(value)
    return number


def _value_of(reward: float | Steps) -> float:
    """What reward/<name> logs for a sample: the number, or the sum of its process rewards."""
    return float(sum(r for _, r in reward)) if isinstance(reward, list) else reward


def _tolerant_values(fn: RewardFn, call_kwargs: dict[str, Any], count: int) -> tuple[list[Any], list[bool], bool]:
    """(values with failures as 0.0, failure flag per sample, whether the call as a whole failed):
    nothing a reward function does raises here."""
    try:
        result = fn(**call_kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        values = list(result)
    except Exception:
        return [0.0] * count, [True] * count, True
    if len(values) != count:
        return [0.0] * count, [True] * count, True
    out, bad = [], []
    for value in values:
        try:
            out.append(_as_reward(value))
            bad.append(False)
        except ValueError:
            out.append(0.0)
            bad.append(True)
    return out, bad, False


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def reward_name(spec: str) -> str:
    """Short name for logging (``reward/<name>``) and for ``reward_kwargs`` keys."""
    if spec.startswith(("http://", "https://")):
        return spec.split("://", 1)[1].split("/", 1)[0]
    if ":" in spec:
        return spec.rpartition(":")[2]
    return Path(spec).name or spec


@dataclass
class RewardOutput:
    total: list[float]                      # weighted sum of the outcome (number) rewards per sample
    components: dict[str, list[float]]     # unweighted values per reward name (process rewards summed)
    failed: list[bool] = field(default_factory=list)  # a function failed on this sample (scored 0)
    steps: list[Steps] | None = None        # weighted process rewards per sample; None when no function gave any

    def combined(self) -> list[float]:
        """Outcome plus process rewards per sample: what a sample earned in all."""
        if self.steps is None:
            return list(self.total)
        return [total + sum(r for _, r in steps) for total, steps in zip(self.total, self.steps)]

    def per_sample(self, completions: list[str]) -> list[float | Steps]:
        """Each sample's reward in the form a reward function returns it: the number, or (with process
        rewards) its pairs plus the outcome as a pair at the end (which lands on the last token)."""
        if self.steps is None:
            return list(self.total)
        return [steps + [(len(text), total)] if steps else total
                for total, steps, text in zip(self.total, self.steps, completions)]


def _combine(names: list[str], weights: list[float], raw: dict[str, list[Any]], count: int) -> RewardOutput:
    """Weighted outcome totals, logged components and weighted process rewards of checked values."""
    total = [sum(w * raw[name][i] for name, w in zip(names, weights) if not isinstance(raw[name][i], list))
             for i in range(count)]
    components = {name: [_value_of(v) for v in raw[name]] for name in names}
    steps = None
    if any(isinstance(v, list) for name in names for v in raw[name]):
        steps = [[(position, w * reward) for name, w in zip(names, weights) if isinstance(raw[name][i], list)
                  for position, reward in raw[name][i]] for i in range(count)]
    return RewardOutput(total=total, components=components, steps=steps)


class CombinedReward:
    """Weighted sum of several reward functions with every output checked.

    Async functions of one batch run concurrently. A function that raises, returns the wrong
    number of values, None, or a non-finite number is reported by name with the sample index.
    With ``on_error`` "skip_batch" or "zero" failures are not raised: the failing samples score 0
    and are flagged in ``RewardOutput.failed`` (the trainer then skips the batch or goes on).
    """

    def __init__(self, specs: list[str], weights: list[float] | None = None,
                 kwargs: dict[str, dict[str, Any]] | None = None, device: Any = None, on_error: str = "raise"):
        self.on_error = on_error
        self.specs = list(specs)
        self.weights = list(weights) if weights is not None else [1.0] * len(specs)
        if len(self.weights) != len(self.specs):
            raise RewardError(f"{len(self.weights)} reward_weights for {len(self.specs)} reward_funcs")
        self.names = self._unique_names()
        kwargs = dict(kwargs or {})
        unknown = set(kwargs) - set(self.names)
        if unknown:
            raise RewardError(f"reward_kwargs for {sorted(unknown)} match no reward_funcs entry (names: {self.names})")
        self.functions = [load_reward_function(spec, kwargs.get(name), device) for spec, name in zip(self.specs, self.names)]

    def _unique_names(self) -> list[str]:
        names: list[str] = []
        for spec in self.specs:
            name = reward_name(spec)
            if name in names:
                name = f"{name}_{len(names)}"
            names.append(name)
        return names

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> RewardOutput:
        call_kwargs = {"prompts": prompts, "completions": completions, **columns}
        if self.on_error != "raise":
            return self._call_tolerant(call_kwargs, completions)
        raw: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        for name, spec, fn in zip(self.names, self.specs, self.functions):
            try:
                result = fn(**call_kwargs)
            except RewardError:
                raise
            except Exception as exc:
                raise RewardError(f"reward {spec!r} raised {_describe(exc)}{_failing_sample(fn, call_kwargs)}") from None
            if inspect.isawaitable(result):
                pending[name] = result
            else:
                raw[name] = result
        if pending:
            raw.update(self._await_all(pending))
        checked = {name: self._check(spec, raw[name], completions) for name, spec in zip(self.names, self.specs)}
        return _combine(self.names, self.weights, checked, len(completions))

    def _call_tolerant(self, call_kwargs: dict[str, Any], completions: list[str]) -> RewardOutput:
        count = len(completions)
        components: dict[str, list[float]] = {}
        failed = [False] * count
        for name, fn in zip(self.names, self.functions):
            values, bad, batch_failed = _tolerant_values(fn, call_kwargs, count)
            if batch_failed:  # it raised on the batch: find the failing samples one at a time
                values, bad = [], []
                for i in range(count):
                    value, one_bad, _ = _tolerant_values(fn, _single_sample(call_kwargs, i), 1)
                    values += value
                    bad += one_bad
            components[name] = values
            failed = [f or b for f, b in zip(failed, bad)]
        output = _combine(self.names, self.weights, components, count)
        output.failed = failed
        return output

    def _await_all(self, pending: dict[str, Any]) -> dict[str, Any]:
        async def gather() -> list[Any]:
            return await asyncio.gather(*pending.values(), return_exceptions=True)

        results = asyncio.run(gather())
        for (name, _), result in zip(pending.items(), results):
            if isinstance(result, BaseException):
                spec = self.specs[self.names.index(name)]
                raise RewardError(f"reward {spec!r} raised {_describe(result)}")
        return dict(zip(pending, results))

    @staticmethod
    def _check(spec: str, values: Any, completions: list[str]) -> list[float | Steps]:
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {spec!r} returned {type(values).__name__}, not a list of floats") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {spec!r} returned {len(values)} values for {len(completions)} completions")
        checked = []
        for i, value in enumerate(values):
            try:
                checked.append(_as_reward(value))
            except ValueError:
                raise RewardError(
                    f"reward {spec!r} returned {value!r} for sample {i} (completion {completions[i][:50]!r}); "
                    "rewards must be finite numbers, or lists of (char_position, reward) pairs for process rewards"
                ) from None
        return checked
