"""Name -> algorithm registries whose entries take only the inputs they name.

A registered function declares, as keyword parameters, exactly what it reads (``values``,
``group_ids``, ``clip_range`` ...). The trainer calls an entry with every input it has; the
entry passes the function the ones it declares. Its hyperparameters are its keyword parameters
with defaults, so a new loss brings its own (set through ``policy_loss_kwargs`` /
``advantage_kwargs``) without touching the config. What an algorithm needs from the trainer
(a value head, groups of samples, a separate old-logprob pass) is registry metadata:

    @POLICY_LOSSES.register("my_loss")
    def my_loss(logprobs, old_logprobs, advantages, mask, *, beta: float = 0.1, loss_agg_mode="token-mean"):
        ...

    @ADVANTAGE_ESTIMATORS.register("my_estimator", values=True)   # needs a critic
    def my_estimator(token_rewards, mask, *, values, gamma: float = 1.0): ...
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable

__all__ = ["Algorithm", "Registry", "declared_kwargs", "variant", "NEEDS"]

# What an entry may say it needs (all default False):
#   values         a value head whose V(s_t) feeds the estimator (GAE)
#   groups         num_generations >= 2 samples per prompt (group baselines)
#   old_logprobs   a separate no-grad pass for the rollout policy's logprobs, even when a single
#                  update could take them from its own forward (TRPO's surrogate and KL)
#   policy_optimizer  False when the optimizer does not step the policy (TRPO's own step does)
#   unsharded_weights the update needs whole LoRA weights (no DeepSpeed/FSDP; TRPO)
NEEDS = {"values": False, "groups": False, "old_logprobs": False, "policy_optimizer": True, "unsharded_weights": False}


def declared_kwargs(fn: Callable, available: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``available`` that ``fn`` names as parameters (all of them if it takes **kwargs).

    Lets the trainer offer every input it has (e.g. ``all_reduce``, ``norm_length``) while a
    registered function, ours or a user's, declares only the ones it reads.
    """
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(available)
    return {name: value for name, value in available.items() if name in parameters}


class Algorithm:
    """A registered function plus what it needs; calling it drops the inputs it does not declare."""

    def __init__(self, name: str, fn: Callable, kind: str, needs: dict[str, bool], inputs: tuple[str, ...] = ()):
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{kind} {name!r}: unknown needs {sorted(unknown)}; valid: {', '.join(NEEDS)}")
        self.name, self.fn, self.kind, self.inputs = name, fn, kind, inputs
        self.needs = {**NEEDS, **needs}
        functools.update_wrapper(self, fn, updated=())  # a class's __dict__ is no attribute of the entry
        # Read once: the entry is called on every micro-batch.
        parameters = inspect.signature(fn).parameters
        self._takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self._parameters = set(parameters)
        keyword = {name: p.default for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        self._required = [name for name, default in keyword.items() if default is inspect.Parameter.empty]
        # Every keyword parameter's default (inputs included), e.g. a loss's own loss_agg_mode.
        self.fn_defaults = {name: default for name, default in keyword.items() if default is not inspect.Parameter.empty}
        # The defaults the trainer does not supply: what a user may set in policy_loss_kwargs / advantage_kwargs.
        self.hyperparameters = {name: default for name, default in self.fn_defaults.items() if name not in inputs}

    def __call__(self, *args: Any, **available: Any) -> Any:
        kwargs = available if self._takes_any else {k: v for k, v in available.items() if k in self._parameters}
        for name in self._required:
            if kwargs.get(name) is None:
                raise ValueError(f"{self.kind} {self.name!r} needs {name} (see its docstring)")
        return self.fn(*args, **kwargs)

    def coerce_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Strings given for a numeric hyperparameter (YAML reads 1e-4 as a string) as that number type."""
        defaults = self.hyperparameters
        out = {}
        for key, value in kwargs.items():
            default = defaults.get(key)
            if isinstance(value, str) and isinstance(default, float):
                try:
                    value = float(value)
                except ValueError:
                    pass
            out[key] = value
        return out

    def check_kwargs(self, kwargs: dict[str, Any], setting: str) -> None:
        """Raise ValueError naming ``setting`` when a key is no hyperparameter of this function."""
        valid = self.hyperparameters
        for key in kwargs:
            if key not in valid:
                close = difflib.get_close_matches(key, list(valid), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{setting}: {self.kind} {self.name!r} has no parameter {key!r}{hint} "
                                 f"(its parameters: {', '.join(valid) or 'none'})")

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name!r}: {self.fn.__module__}.{self.fn.__qualname__}>"


class Registry(dict):
    """name -> Algorithm; a missing name raises ``ValueError`` listing the valid names."""

    def __init__(self, kind: str, inputs: tuple[str, ...] = ()):
        super().__init__()
        self.kind = kind
        self.inputs = inputs  # what the trainer supplies; the other keyword parameters are hyperparameters

    def __missing__(self, name: str) -> Algorithm:
        raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self))}")

    def register(self, name: str, **needs: bool) -> Callable[[Callable], Callable]:
        """Decorator: ``@REGISTRY.register("name", values=True)``; returns the function unchanged."""

        def decorator(fn: Callable) -> Callable:
            self[name] = Algorithm(name, fn, self.kind, needs, self.inputs)
            return fn

        return decorator


def variant(fn: Callable, name: str, doc: str, **defaults: Any) -> Callable:
    """``fn`` with other defaults for some keyword parameters, under its own name and docstring
    (e.g. Dr. GRPO = GRPO without the std division): one implementation, two registry names."""
    bound = functools.partial(fn, **defaults)
    bound.__name__ = bound.__qualname__ = name
    bound.__module__ = fn.__module__
    bound.__doc__ = doc
    return bound
