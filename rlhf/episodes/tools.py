"""Tools and environments for multi-turn episodes, with TRL's interface (GRPOTrainer ``tools=`` /
``environment_factory=``, TRL 1.16).

- A *tool* is a plain Python function (sync or ``async``) with type hints and a Google-style
  docstring; transformers' ``get_json_schema`` turns it into the JSON schema the chat template
  renders (``tools=``).
- An *environment factory* is a callable returning an object with ``reset(**row) -> str | None``
  (a string is appended to the prompt's last message), public methods that are its tools, and an
  optional ``get_reward() -> float`` (an episode reward, as TRL). A dict of factories picks one per
  row by the row's ``environment`` column. Instances are pooled and reset for every episode.
- Turn rewards (ours; TRL has none): a tool may return ``{"observation": str, "reward": float}``.
  The observation becomes the tool message and the reward is credited to the turn that made the
  call (rlhf.episodes.sampling puts it on that turn's last sampled token). Any other return value
  becomes the tool message as ``str(value)``, as in TRL.
- A call that raises, runs past ``tool_timeout`` or names an unknown tool gives the observation
  ``str({"error": ...})`` (TRL's form) and counts as a failure; it never stops the run.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from reward_models.guard import RewardTimeout, run_guarded
from reward_models.loader import import_user_file, run_coroutine
from rlhf.errors import ConfigError, DataError

Tool = Callable[..., Any]
Factory = Callable[[], Any]
# Methods of an environment that are not tools (TRL's rule: also every name starting with "_").
NOT_TOOLS = ("reset", "get_reward")


def tool_schema(tool: Tool) -> dict[str, Any]:
    """The JSON schema of one tool, as the chat template's ``tools=`` takes it (transformers'
    ``get_json_schema``); ConfigError in one line when the function cannot be described."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(tool)
    except Exception as exc:  # DocstringParsingException, TypeHintParsingException, ...
        name = getattr(tool, "__name__", type(tool).__name__)
        raise ConfigError(f"tool {name!r} cannot be described to the model: {str(exc).splitlines()[0]} "
                          "(a tool needs type hints and a Google-style docstring with an Args: section)") from None


class Toolbox:
    """The tools one episode may call: name -> function, and their schemas for the chat template.

    Built from standalone tools plus (for an environment) the instance's public methods; schemas
    are computed once per function (``schema_cache`` keyed by the underlying function, so every
    instance of an environment class shares them)."""

    def __init__(self, tools: list[Tool], schema_cache: dict[Any, dict[str, Any]] | None = None):
        cache = schema_cache if schema_cache is not None else {}
        self.functions: dict[str, Tool] = {}
        self.schemas: list[dict[str, Any]] = []
        for tool in tools:
            key = getattr(tool, "__func__", tool)  # a bound method: its class's function
            if key not in cache:
                cache[key] = tool_schema(tool)
            schema = cache[key]
            name = schema["function"]["name"]
            if name in self.functions:
                raise ConfigError(f"two tools are named {name!r}; tool names must be unique within an episode")
            self.functions[name] = tool
            self.schemas.append(schema)

    def __bool__(self) -> bool:
        return bool(self.functions)


@dataclass
class ToolOutcome:
    """One executed tool call: the tool message's name and content, the turn reward it returned
    (0.0 if none), and whether it failed (raised, timed out, unknown tool, bad arguments)."""

    name: str
    content: str
    reward: float = 0.0
    failed: bool = False


def _error(name: str, message: str) -> ToolOutcome:
    return ToolOutcome(name=name, content=str({"error": message}), failed=True)


def _outcome(name: str, value: Any) -> ToolOutcome:
    """A tool's return value as an outcome: the reward form, a list of text parts, or str(value)."""
    if isinstance(value, dict) and set(value) == {"observation", "reward"}:
        reward = value["reward"]
        if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
            return _error(name, f"tool {name!r} returned reward {reward!r}; a turn reward must be a finite number")
        return ToolOutcome(name=name, content=str(value["observation"]), reward=float(reward))
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return ToolOutcome(name=name, content="".join(str(p.get("text", "")) for p in value))
    return ToolOutcome(name=name, content=str(value))


def _call_parts(call: Any) -> tuple[str, Any]:
    """(name, arguments) of a parsed tool call: TRL's nested ``{"type": "function", "function":
    {...}}`` form or the flat ``{"name", "arguments"}`` one."""
    if not isinstance(call, dict):
        return "unknown", None
    if call.get("type", "function") != "function":
        return str(call.get("name", "unknown")), None
    function = call.get("function", call)
    if not isinstance(function, dict):
        return "unknown", None
    name = function.get("name")
    return (name if isinstance(name, str) else "unknown"), function.get("arguments")


def run_tool_calls(calls: list[tuple[Toolbox, Any]], timeout: float | None = None) -> list[ToolOutcome]:
    """Execute tool calls, one outcome per call in order; nothing a tool does raises here.

    ``calls``: (the episode's toolbox, one parsed tool call) pairs, e.g. every call of every row
    whose turn just ended. Sync tools run one after another (a shared tool need not be
    thread-safe), each under ``timeout`` seconds (a timed-out call is abandoned in a daemon
    thread, reward_models.guard); async tools of the whole list run concurrently on one event loop.
    """
    outcomes: list[ToolOutcome | None] = [None] * len(calls)
    pending: dict[int, tuple[str, Any]] = {}  # index -> (name, coroutine)
    for index, (toolbox, call) in enumerate(calls):
        name, arguments = _call_parts(call)
        if isinstance(call, dict) and call.get("type", "function") != "function":
            outcomes[index] = _error(name, f"Unsupported tool call type: {call.get('type')}")
            continue
        tool = toolbox.functions.get(name)
        if tool is None:
            outcomes[index] = _error(name, f"Tool {name} not found.")
            continue
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            outcomes[index] = _error(name, f"arguments of {name} must be a JSON object, got {type(arguments).__name__}")
            continue
        if inspect.iscoroutinefunction(tool):
            try:
                pending[index] = (name, tool(**arguments))
            except Exception as exc:  # wrong arguments fail at the call, before any await
                outcomes[index] = _error(name, str(exc))
            continue
        try:
            value = run_guarded(lambda tool=tool, arguments=arguments: tool(**arguments), f"tool {name}", timeout)
        except RewardTimeout:  # the guard's deadline (the call may go on in its daemon thread)
            outcomes[index] = _error(name, f"tool {name} did not return within tool_timeout={timeout:g} s")
        except (Exception, SystemExit) as exc:  # SystemExit too: a tool must not end the run
            outcomes[index] = _error(name, str(exc))
        else:
            outcomes[index] = _outcome(name, value)
    if pending:
        for index, outcome in zip(pending, _await_tools(list(pending.values()), timeout)):
            outcomes[index] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


def _await_tools(named: list[tuple[str, Any]], timeout: float | None) -> list[ToolOutcome]:
    async def one(name: str, coroutine: Any) -> ToolOutcome:
        try:
            value = await (asyncio.wait_for(coroutine, timeout) if timeout is not None else coroutine)
        except asyncio.TimeoutError:
            return _error(name, f"tool {name} did not return within tool_timeout={timeout:g} s")
        except Exception as exc:
            return _error(name, str(exc))
        return _outcome(name, value)

    async def gather() -> list[ToolOutcome]:
        return list(await asyncio.gather(*(one(name, coroutine) for name, coroutine in named)))

    # The guard's deadline is a backstop for a coroutine that blocks its event loop.
    try:
        return run_guarded(lambda: run_coroutine(gather()), "async tools", None if timeout is None else timeout + 1.0)
    except RewardTimeout:
        return [_error(name, f"tool {name} blocked its event loop past tool_timeout={timeout:g} s")
                for name, _ in named]


def environment_tools(instance: Any) -> list[Tool]:
    """An environment's tools: its class's public functions other than reset/get_reward, bound to
    it (read on the class, so properties are not evaluated; TRL's rule)."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if name not in NOT_TOOLS and not name.startswith("_")]


class EnvironmentPool:
    """Environment instances for a batch of episodes: created once, reset for every episode.

    ``factory``: a callable (one environment for every row) or {name: callable} (the row's
    ``environment`` column picks one). Each factory is probed once here to check that its
    instances have ``reset``; the probe seeds the pool. ``take`` hands out one instance per row,
    creating more only when a batch needs more of one environment than exist.
    """

    def __init__(self, factory: Factory | dict[str, Factory]):
        self.multi = isinstance(factory, dict)
        self.factories: dict[str | None, Factory] = dict(factory) if self.multi else {None: factory}
        if not self.factories:
            raise ConfigError("environment_factory is an empty dict; give at least one factory")
        self.pool: dict[str | None, list[Any]] = {}
        for name, make in self.factories.items():
            if not callable(make):
                raise ConfigError(f"environment_factory{'' if name is None else f'[{name!r}]'} is not callable")
            instance = self._make(name)
            if not callable(getattr(instance, "reset", None)):
                raise ConfigError(f"environment {type(instance).__name__} has no reset(**row) method "
                                  "(an environment_factory must return objects with reset)")
            self.pool[name] = [instance]
        self.classes = {name: type(instances[0]) for name, instances in self.pool.items()}

    def names(self, rows: list[dict[str, Any]]) -> list[str | None]:
        """Each row's environment name (None for a single factory); DataError for an unknown one."""
        if not self.multi:
            return [None] * len(rows)
        names = [row.get("environment") for row in rows]
        unknown = sorted({str(n) for n in names if n not in self.factories})
        if unknown:
            raise DataError(f"rows name environment {', '.join(unknown)}, which environment_factory does not have "
                            f"(it has {', '.join(map(str, self.factories))})")
        return names

    def take(self, names: list[str | None]) -> list[Any]:
        """One instance per entry of ``names`` (no instance twice), growing the pool as needed."""
        handed: dict[str | None, int] = {}
        taken = []
        for name in names:
            index = handed.get(name, 0)
            if index == len(self.pool[name]):
                self.pool[name].append(self._make(name))
            handed[name] = index + 1
            taken.append(self.pool[name][index])
        return taken

    def _make(self, name: str | None) -> Any:
        """A new instance from the factory ``name``; what it raises becomes one ConfigError line."""
        make = self.factories[name]
        try:
            return make()
        except Exception as exc:  # user code: the run reports it in one line, not a traceback
            label = getattr(make, "__name__", type(make).__name__)
            raise ConfigError(f"environment_factory {label}() raised {type(exc).__name__}: {exc} (it is called "
                              "with no arguments, once per concurrent episode)") from None

    def reset(self, instance: Any, row: dict[str, Any]) -> str | None:
        """``instance.reset(**row)`` (without the routing ``environment`` column when several
        environments are given, as TRL); a string result is what the prompt gets appended.
        What reset raises becomes one DataError line naming the row's columns."""
        kwargs = {k: v for k, v in row.items() if k != "environment"} if self.multi else dict(row)
        try:
            observation = instance.reset(**kwargs)
        except Exception as exc:  # user code, often a signature that does not take every column
            raise DataError(f"{type(instance).__name__}.reset(**row) raised {type(exc).__name__}: {exc} (the row's "
                            f"columns: {', '.join(kwargs)}; give reset a **kwargs parameter for the ones it "
                            "does not use)") from None
        return observation if isinstance(observation, str) else None

    def reward_functions(self) -> list[tuple[str, Callable[..., list[float | None]]]]:
        """(name, fn) for every environment class with ``get_reward``: the episode reward as a
        reward function ``fn(prompts, completions, environments, **columns)``, named after the
        class (TRL logs it as rewards/<class name>). A row whose environment is another class gets
        None (not applicable)."""
        functions = []
        for cls in dict.fromkeys(self.classes.values()):
            if not callable(getattr(cls, "get_reward", None)):
                continue
            if inspect.iscoroutinefunction(cls.get_reward):
                async def reward(prompts: Any = None, completions: Any = None, environments: Any = (),
                                 _cls: type = cls, **columns: Any) -> list[float | None]:
                    return [await e.get_reward() if type(e) is _cls else None for e in environments]
            else:
                def reward(prompts: Any = None, completions: Any = None, environments: Any = (),
                           _cls: type = cls, **columns: Any) -> list[float | None]:
                    return [e.get_reward() if type(e) is _cls else None for e in environments]
            reward.__name__ = cls.__name__
            functions.append((cls.__name__, reward))
        return functions


def load_object(spec: str, what: str = "tool") -> Any:
    """The object a ``path/to/file.py:name`` or ``package.module:name`` spec names (the
    convention of reward_funcs, reward_models.loader), for ``--tools`` and ``--environment``.
    ConfigError in one line when the file, module or name is missing or the file fails to import."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"{what} {spec!r}: expected path/to/file.py:name or package.module:name")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"{what} file not found: {path} (from {spec!r})")
        try:
            module = import_user_file(path, "rlhf_user_tools_")
        except Exception as exc:
            raise ConfigError(f"{what} file {path} failed to import: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ConfigError(f"cannot import module {target!r} for {what} {spec!r}: "
                              f"{type(exc).__name__}: {exc}") from None
    found = getattr(module, name, None)
    if not callable(found):
        raise ConfigError(f"{what} {spec!r}: {target} has no function or class {name!r}")
    return found


def load_tools(specs: list[str | Tool]) -> list[Tool]:
    """``--tools`` entries (specs or functions) as functions, each checked to have a schema."""
    tools = [load_object(spec, "tool") if isinstance(spec, str) else spec for spec in specs]
    for tool in tools:
        tool_schema(tool)
    return tools


def load_environment(spec: str | Factory | dict[str, str | Factory]) -> Factory | dict[str, Factory]:
    """``--environment`` (a spec, a factory, or {name: spec or factory}) as factories."""
    if isinstance(spec, dict):
        return {name: load_object(s, "environment") if isinstance(s, str) else s for name, s in spec.items()}
    return load_object(spec, "environment") if isinstance(spec, str) else spec
