"""Turn ``reward_funcs`` entries into callables and combine them with validated outputs.

Every reward follows TRL's GRPOTrainer convention (``_calculate_rewards``, TRL 1.16):
``fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``.

- Plain-text data: ``prompts`` and ``completions`` are strings. Conversational data (the prompt
  column holds {role, content} messages): ``prompts`` are the message lists and each completion
  is ``[{"role": "assistant", "content": text}]``.
- ``completion_ids``: the response's token ids (up to and including EOS) per sample.
- Every other dataset column arrives as a keyword (not ``prompt``, ``completion``,
  ``completion_ids``), and so do ``log_metric(name, value)`` and ``log_extra(column, values)``
  (they record into metrics.jsonl / samples.jsonl in training and do nothing elsewhere) and, in
  training and its periodic evaluation, ``trainer_state`` (``global_step``, ``max_steps``).
- ``None`` for a sample means "not applicable": it is left out of the weighted sum and of that
  function's mean. A sample for which every function returns None is *unscorable*
  (``RewardOutput.unscorable``); the trainer warns and leaves it out of the update.

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
import concurrent.futures
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reward_models.builtins import BUILTIN_REWARDS
from reward_models.guard import RewardTimeout, run_guarded
from rlhf.errors import RewardError, RewardUnavailable
from rlhf.paths import looks_local

# the names TRL's `trl grpo` script reads as reward_funcs (trl/scripts/grpo.py)
TRL_SCRIPT_REWARDS = {name: f"trl.rewards:{name}" for name in ("accuracy_reward", "reasoning_accuracy_reward",
                                                              "think_format_reward", "get_soft_overlong_punishment")}
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max (no torch import here)

RewardFn = Callable[..., Any]


def load_reward_function(spec: str | RewardFn, kwargs: dict[str, Any] | None = None, device: Any = None) -> RewardFn:
    """Resolve one ``reward_funcs`` entry (a spec string, or a Python callable given through the
    API); ``kwargs`` are its ``reward_kwargs``."""
    kwargs = dict(kwargs or {})
    if _is_torch_module(spec):  # a loaded reward model, as TRL's reward_funcs take one
        from reward_models.learned import LearnedReward

        return LearnedReward.from_model(spec, device=device, **kwargs)
    if callable(spec):
        return _with_kwargs(spec, kwargs) if kwargs else spec
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
    if Path(spec).is_dir() or (spec.count("/") == 1 and not looks_local(spec)):
        from reward_models.learned import LearnedReward

        return LearnedReward(spec, device=device, **kwargs)
    if looks_local(spec):  # e.g. outputs/reward_model before train_reward_model.py wrote it: not a hub id
        raise RewardError(f"reward model dir not found: {spec} (a local path; train_reward_model.py writes one)")
    if spec in TRL_SCRIPT_REWARDS or (re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", spec) and not spec.endswith(".py")):
        # what TRL's own `trl grpo` script takes: its reward names, or a dotted import path
        target = TRL_SCRIPT_REWARDS.get(spec) or ":".join(spec.rsplit(".", 1))
        fn = _load_user_function(target)
        if spec == "get_soft_overlong_punishment":  # a factory: TRL's script calls it with these
            return fn(**(kwargs or {"max_completion_len": 1280, "soft_punish_cache": 256}))
        return _with_kwargs(fn, kwargs) if kwargs else fn
    raise RewardError(
        f"unknown reward {spec!r}: use a built-in ({', '.join(BUILTIN_REWARDS)}), one of TRL's "
        f"({', '.join(TRL_SCRIPT_REWARDS)}), path/to/file.py:function, package.module:function (or "
        "package.module.function), a reward-model dir, or an http(s):// URL"
    )


def _with_kwargs(fn: RewardFn, extra: dict[str, Any]) -> RewardFn:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **{**kwargs, **extra})  # the configured reward_kwargs win
        call_async.__name__ = callable_name(fn)
        return call_async

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{**kwargs, **extra})  # the configured reward_kwargs win over same-named columns
    call.__name__ = callable_name(fn)
    return call


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # no model object can exist without torch imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def callable_name(fn: Any) -> str:
    """A Python reward's name as TRL shows it: the function's __name__ (a partial's function's, a
    callable object's class name)."""
    if _is_torch_module(fn):  # a reward model: its name or path, as TRL names it
        name = getattr(getattr(fn, "config", None), "_name_or_path", "") or type(fn).__name__
        return Path(name).name or name
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__name__", None) or type(inner).__name__


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


def _is_call_mismatch(exc: BaseException) -> bool:
    """A TypeError raised by the call itself (a missing or unexpected argument), not inside the
    function: its traceback ends in this file."""
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, TypeError) and bool(frames) and frames[-1].filename == __file__


def _call_mismatch_message(label: str, exc: BaseException, call_kwargs: dict[str, Any]) -> str:
    """A parameter no call passes (a dataset column the dataset lacks) is named as such; any
    other mismatch (a keyword the function does not take) asks for **kwargs."""
    text = str(exc)
    if "missing" in text and "required" in text:
        lacking = [name for name in re.findall(r"'(\w+)'", text.split(":", 1)[-1]) if name not in call_kwargs]
        if lacking:
            return (f"reward {label!r} needs {', '.join(map(repr, lacking))}, which no reward call here passes: it is "
                    f"not a column of the dataset nor one of the arguments reward functions get "
                    f"({', '.join(call_kwargs)}); add the column to the dataset, or give the parameter a default")
    return (f"reward {label!r} cannot take the arguments reward functions get ({', '.join(call_kwargs)}): {text}; "
            "add **kwargs to its signature")


def _label(spec: Any) -> str:
    """How messages name a reward: its spec string, or a Python callable's name."""
    return spec if isinstance(spec, str) else callable_name(spec)


def _text(completion: Any) -> str:
    """A completion's text for messages: the string, or its messages' contents."""
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _describe(exc: BaseException) -> str:
    """The exception plus the user's line that raised it (the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f" at {Path(exc.filename or '?').name}:{exc.lineno}"
    return f"{type(exc).__name__}: {exc}{where}"


def import_user_file(path: Path, prefix: str) -> Any:
    """``path`` imported as a module named ``prefix`` + a hash of its resolved path, once: several
    names taken from one file share one module (and its state). An import that raises leaves no
    half-made module behind and re-raises."""
    module_name = prefix + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
    return module


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise RewardError(f"reward file not found: {path} (from reward_funcs entry {spec!r})")
    try:
        return import_user_file(path, "rlhf_user_reward_")
    except Exception as exc:
        raise RewardError(f"reward file {path} failed to import: {_describe(exc)}") from None


def _subset(call_kwargs: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """The keyword arguments of a reward call cut down to the samples ``indices`` (per-sample lists only)."""
    count = len(call_kwargs["completions"])
    return {k: ([v[i] for i in indices] if isinstance(v, list) and len(v) == count else v)
            for k, v in call_kwargs.items()}


Invoke = Callable[[Callable[[], Any]], Any]  # runs a reward call (rlhf.reward_models.guard)


def _direct(work: Callable[[], Any]) -> Any:
    return work()


def _called(fn: RewardFn, call_kwargs: dict[str, Any]) -> Callable[[], Any]:
    """The whole call of ``fn`` (awaited if it is async), for an Invoke."""
    def work() -> Any:
        result = fn(**call_kwargs)
        return run_coroutine(_awaited(result)) if inspect.isawaitable(result) else result

    return work


def _as_list(values: Any) -> list[Any]:
    """A function's batch result as a list: a list, tuple, numpy array or torch tensor of values.
    A dict (its keys), a string (its characters) or a scalar is no batch: TypeError."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(type(values).__name__)
    return list(values)


def _failing_sample(fn: RewardFn, call_kwargs: dict[str, Any], invoke: Invoke = _direct) -> str:
    """Which sample breaks a failed batch, found by bisection (about 2 log2(n) calls on halves,
    not one call per sample): '' when no part fails alone."""
    def fails(indices: list[int]) -> bool:
        try:
            invoke(_called(fn, _subset(call_kwargs, indices)))
        except RewardUnavailable:
            return False  # a timeout or lost server says nothing about the sample
        except (Exception, SystemExit):
            return True
        return False

    suspects = list(range(len(call_kwargs["completions"])))
    whole_batch = True
    while len(suspects) > 1:
        first, second = suspects[:len(suspects) // 2], suspects[len(suspects) // 2:]
        if fails(first):
            if whole_batch and fails(second):
                return " on every part of the batch (no one sample is to blame)"
            suspects = first
        elif fails(second):
            suspects = second
        else:
            return ""  # the batch fails only as a whole
        whole_batch = False
    return f" on sample {suspects[0]} (completion {_text(call_kwargs['completions'][suspects[0]])[:50]!r})"


Steps = list[tuple[int, float]]  # process rewards of one sample: (char_position, reward)
Value = "float | Steps | None"  # one sample's checked value; None = not applicable (TRL)


def _as_reward(value: Any) -> float | Steps | None:
    """A sample's value as a finite number, process rewards or None (not applicable); ValueError
    otherwise."""
    value = _one_element(value)  # a row of an [N, 1] array (an object array's may say None)
    if value is None:
        return None
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


def _one_element(value: Any) -> Any:
    """A numpy array's or tensor's one element, as torch.tensor(...) reads a row of an [N, 1] one;
    anything else as it is. ValueError for an array of more elements."""
    if not (getattr(value, "ndim", 0) and hasattr(value, "item")):
        return value
    try:
        return value.item()
    except (ValueError, RuntimeError):
        raise ValueError(value) from None


def _finite(value: Any) -> float:
    """A number (bool, int, float, a numpy or torch value of one element) as a finite float. Strings
    are refused as TRL's torch.tensor(...) refuses them; bools count 1/0 as there."""
    value = _one_element(value)
    if value is None or isinstance(value, (str, bytes)):  # an array of text is text
        raise ValueError(value)
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(value) from None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:  # scores are float32 tensors: 1e39 would be inf
        raise ValueError(value)
    return number


def _value_of(reward: float | Steps | None) -> float:
    """What rewards/<name>/mean logs for a sample: the number, the sum of its process rewards, or NaN
    when not applicable (left out of the function's mean)."""
    if reward is None:
        return math.nan
    return float(sum(r for _, r in reward)) if isinstance(reward, list) else reward


def _tolerant_values(fn: RewardFn, call_kwargs: dict[str, Any], count: int,
                     invoke: Invoke = _direct) -> tuple[list[Any], list[bool], str | None]:
    """(values with failures as 0.0, failure flag per sample, how the call as a whole failed:
    None, "raised" or "unavailable" (timeout, lost server)): nothing a reward function does
    raises here."""
    try:
        values = _as_list(invoke(_called(fn, call_kwargs)))
    except RewardUnavailable:
        return [0.0] * count, [True] * count, "unavailable"
    except (Exception, SystemExit):
        return [0.0] * count, [True] * count, "raised"
    if len(values) != count:
        return [0.0] * count, [True] * count, "raised"
    out, bad = [], []
    for value in values:
        try:
            out.append(_as_reward(value))
            bad.append(False)
        except ValueError:
            out.append(0.0)
            bad.append(True)
    return out, bad, None


def _tolerant_search(fn: RewardFn, call_kwargs: dict[str, Any], indices: list[int],
                     invoke: Invoke) -> tuple[list[Any], list[bool]]:
    """Values and failure flags of ``indices``; a part that raises is split in halves until the
    failing samples are found (k failures among n cost about 2k log2(n) calls, not n). A call
    that failed as a whole (timeout, lost server) fails all its samples without a search: each
    retry would fail (or wait) the same way."""
    values, bad, failure = _tolerant_values(fn, _subset(call_kwargs, indices), len(indices), invoke)
    if failure != "raised" or len(indices) == 1:
        return values, bad
    middle = len(indices) // 2
    first_values, first_bad = _tolerant_search(fn, call_kwargs, indices[:middle], invoke)
    second_values, second_bad = _tolerant_search(fn, call_kwargs, indices[middle:], invoke)
    return first_values + second_values, first_bad + second_bad


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def run_coroutine(coroutine: Any) -> Any:
    """Run a coroutine to completion, also when the caller already runs an event loop (Jupyter,
    an async application): then on a fresh loop in a worker thread, as asyncio.run cannot nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def reward_name(spec: str | RewardFn) -> str:
    """Short name for logging (``rewards/<name>/mean``) and for ``reward_kwargs`` keys."""
    if callable(spec):
        return callable_name(spec)
    if spec.startswith(("http://", "https://")):
        return spec.split("://", 1)[1].split("/", 1)[0]
    if ":" in spec:
        return spec.rpartition(":")[2]
    return Path(spec).name or spec


@dataclass
class RewardOutput:
    total: list[float]                      # weighted sum of the applicable outcome (number) rewards per sample
    components: dict[str, list[float]]     # unweighted values per reward name (process rewards summed; NaN = None)
    failed: list[bool] = field(default_factory=list)  # a function failed on this sample (scored 0)
    steps: list[Steps] | None = None        # weighted process rewards per sample; None when no function gave any
    unscorable: list[bool] = field(default_factory=list)  # every function returned None for this sample

    def combined(self) -> list[float]:
        """Outcome plus process rewards per sample: what a sample earned in all (NaN: unscorable)."""
        steps = self.steps or [[] for _ in self.total]
        unscorable = self.unscorable or [False] * len(self.total)
        return [math.nan if skip else total + sum(r for _, r in pairs)
                for total, pairs, skip in zip(self.total, steps, unscorable)]

    def per_sample(self, completions: list[str]) -> list[float | Steps]:
        """Each sample's reward in the form a reward function returns it: the number, or (with process
        rewards) its pairs plus the outcome as a pair at the end (which lands on the last token)."""
        unscorable = self.unscorable or [False] * len(self.total)
        if self.steps is None:
            return [None if skip else total for total, skip in zip(self.total, unscorable)]
        return [None if skip else steps + [(len(text), total)] if steps else total
                for total, steps, text, skip in zip(self.total, self.steps, completions, unscorable)]


def _combine(names: list[str], weights: list[float], raw: dict[str, list[Any]], count: int) -> RewardOutput:
    """Weighted outcome totals, logged components and weighted process rewards of checked values.
    None (not applicable) adds nothing; a sample where every function gave None is unscorable."""
    total = [sum(w * raw[name][i] for name, w in zip(names, weights) if isinstance(raw[name][i], float))
             for i in range(count)]
    components = {name: [_value_of(v) for v in raw[name]] for name in names}
    steps = None
    if any(isinstance(v, list) for name in names for v in raw[name]):
        steps = [[(position, w * reward) for name, w in zip(names, weights) if isinstance(raw[name][i], list)
                  for position, reward in raw[name][i]] for i in range(count)]
    unscorable = [all(raw[name][i] is None for name in names) for i in range(count)]
    output = RewardOutput(total=total, components=components, steps=steps, unscorable=unscorable)
    for i, value in enumerate(output.combined()):  # each value was in range; their weighted sum may not be
        if math.isfinite(value) and abs(value) > FLOAT32_MAX or math.isinf(value):
            raise RewardError(f"sample {i}'s weighted reward sum is {value:g}, past float32's range (|r| <= 3.4e38) "
                              "that the scores are kept in; scale the rewards or reward_weights down")
    return output


def _ignore(*args: Any, **kwargs: Any) -> None:
    """log_metric / log_extra where nothing records them (no training run)."""


def is_conversational(prompt: Any) -> bool:
    """TRL's test: a prompt given as a list of {role, content} messages."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def trl_inputs(prompts: list[Any], completions: list[Any]) -> tuple[list[Any], list[Any]]:
    """Prompts and completions in the form TRL's reward functions expect: with conversational
    prompts each completion string becomes ``[{"role": "assistant", "content": text}]``."""
    prompts, completions = list(prompts), list(completions)
    if prompts and is_conversational(prompts[0]):
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    return prompts, completions


class CombinedReward:
    """Weighted sum of several reward functions with every output checked.

    Async functions of one batch run concurrently. A function that raises, returns the wrong
    number of values, None, or a non-finite number is reported by name with the sample index.
    With ``on_error`` "skip_batch" or "zero" failures are not raised: the failing samples score 0
    and are flagged in ``RewardOutput.failed`` (the trainer then skips the batch or goes on).
    """

    def __init__(self, specs: list[str | RewardFn], weights: list[float] | None = None,
                 kwargs: dict[str, dict[str, Any]] | None = None, device: Any = None, on_error: str = "raise",
                 timeout: float | None = None):
        self.on_error = on_error
        self.timeout = timeout  # seconds per function call (reward_timeout); None = no limit
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

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> RewardOutput:
        """Score a batch. ``prompts``: strings or message lists; ``completions``: strings (turned
        into assistant messages for conversational prompts, as TRL passes them) or already in
        TRL's form; ``columns``: completion_ids, the dataset's other columns, trainer extras."""
        prompts, completions = trl_inputs(prompts, completions)
        # TRL always passes these; outside a trainer (evaluate.py, the reward server) they do nothing.
        columns.setdefault("log_metric", _ignore)
        columns.setdefault("log_extra", _ignore)
        call_kwargs = {"prompts": prompts, "completions": completions, **columns}
        if self.on_error != "raise":
            return self._call_tolerant(call_kwargs, completions)
        raw: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        for name, spec, fn in zip(self.names, self.specs, self.functions):
            try:
                # async functions return their coroutine at once; _await_all runs them together
                result = self._invoke(_label(spec), lambda: fn(**call_kwargs))
            except RewardError:
                raise
            except (Exception, SystemExit) as exc:  # SystemExit too: it would end the run with rc 0
                if _is_call_mismatch(exc):
                    raise RewardError(_call_mismatch_message(_label(spec), exc, call_kwargs)) from None
                found = _failing_sample(fn, call_kwargs, lambda work: self._invoke(_label(spec), work))
                raise RewardError(f"reward {_label(spec)!r} raised {_describe(exc)}{found}") from None
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
        for name, spec, fn in zip(self.names, self.specs, self.functions):
            values, bad = _tolerant_search(fn, call_kwargs, list(range(count)),
                                           lambda work, label=_label(spec): self._invoke(label, work))
            components[name] = values
            failed = [f or b for f, b in zip(failed, bad)]
        output = _combine(self.names, self.weights, components, count)
        output.failed = failed
        # A failed sample scores 0 (it is flagged), so it is not also "unscorable".
        output.unscorable = [u and not f for u, f in zip(output.unscorable, failed)]
        return output

    def _invoke(self, label: str, work: Callable[[], Any]) -> Any:
        """A reward call under reward_timeout (reward_models.guard)."""
        return run_guarded(work, label, self.timeout)

    def _await_all(self, pending: dict[str, Any]) -> dict[str, Any]:
        timeout = self.timeout
        timed_out = object()

        async def limited(awaitable: Any) -> Any:
            task = asyncio.ensure_future(awaitable)
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:  # not asyncio.wait_for: a TimeoutError the function raises itself stays its own
                task.cancel()
                return timed_out
            return task.result()

        async def gather() -> list[Any]:
            return await asyncio.gather(*map(limited, pending.values()), return_exceptions=True)

        # The guard's own deadline is a backstop for a coroutine that blocks its event loop.
        results = run_guarded(lambda: run_coroutine(gather()), "async reward functions",
                              None if timeout is None else timeout + 1.0,
                              f"reward_timeout={timeout:g} s: one of them blocks its event loop" if timeout else None)
        for (name, _), result in zip(pending.items(), results):
            spec = self.specs[self.names.index(name)]
            if result is timed_out:
                raise RewardTimeout(f"reward {_label(spec)!r} did not return within reward_timeout={timeout:g} s; "
                                    "make it faster or raise reward_timeout")
            if isinstance(result, BaseException):
                raise RewardError(f"reward {_label(spec)!r} raised {_describe(result)}")
        return dict(zip(pending, results))

    @staticmethod
    def _check(spec: Any, values: Any, completions: list[Any]) -> list[float | Steps | None]:
        try:
            values = _as_list(values)
        except TypeError:
            raise RewardError(f"reward {_label(spec)!r} returned {type(values).__name__}, not a list of floats") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {_label(spec)!r} returned {len(values)} values for {len(completions)} completions")
        checked = []
        for i, value in enumerate(values):
            try:
                checked.append(_as_reward(value))
            except ValueError:
                raise RewardError(
                    f"reward {_label(spec)!r} returned {value!r} for sample {i} (completion "
                    f"{_text(completions[i])[:50]!r}); rewards must be finite numbers (float32's range: |r| <= 3.4e38), None (not applicable), "
                    "or lists of (char_position, reward) pairs for process rewards"
                ) from None
        return checked
