"""What an evaluation reads back from the run that made a checkpoint (its config.yaml): the
reward functions it trained with, and its tools, environments and chat template (issue 24), so a
run is evaluated the way it was trained unless told otherwise (rlhf.evaluate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlhf.errors import ConfigError

if TYPE_CHECKING:
    from rlhf.episodes import ToolEpisodes
    from rlhf.evaluate import Candidate


def run_rewards(candidates: list[Candidate], weights: list[float] | None, kwargs: dict[str, Any] | None,
                environment_pays: bool = False) -> tuple[list[Any], list[float] | None, dict[str, Any], str]:
    """The reward settings of the first candidate whose run dir has a config.yaml (its
    reward_funcs, weights and kwargs; given weights/kwargs win), else the sentiment built-in.
    ``environment_pays``: an environment's get_reward is a reward source, so a run's empty
    reward_funcs is its own setting (not a missing one) and the default is no function."""
    from rlhf.card import read_run_settings

    for candidate in candidates:
        if candidate.adapter_dir is None:
            continue
        run = read_run_settings(candidate.adapter_dir)
        if run is not None and (run[1].get("reward_funcs") or (environment_pays and "reward_funcs" in run[1])):
            settings = run[1]
            source = f"the run's own, from the config.yaml next to {candidate.adapter_dir}"
            return ([_importable(spec, "reward_funcs") for spec in settings["reward_funcs"]],
                    weights if weights is not None else settings.get("reward_weights"),
                    kwargs if kwargs else settings.get("reward_kwargs") or {}, source)
    if environment_pays:
        source = "the environment's get_reward: no run config.yaml found next to the checkpoints"
        return [], weights, kwargs or {}, source
    return ["sentiment"], weights, kwargs or {}, "default: no run config.yaml found next to the checkpoints"


def evaluation_reward(candidates: list[Candidate], reward_funcs: list[Any] | None, weights: list[float] | None,
                      kwargs: dict[str, Any] | None, episodes: ToolEpisodes | None,
                      device: Any) -> tuple[Any, dict[str, Any]]:
    """The reward an evaluation scores with (reward_models.CombinedReward) and its report.json
    settings (reward_funcs, reward_source, reward_weights, reward_kwargs). Unset reward_funcs are
    the run's own (run_rewards); each environment class's get_reward joins them, weight 1, named
    after the class, as in training (rlhf.trainer.combined_reward)."""
    from reward_models import CombinedReward

    environment_rewards = episodes.reward_functions() if episodes is not None else []
    source = "given"
    # an empty list means "none" only where an environment pays (a bare --reward_funcs with --environment)
    if reward_funcs is None or (not reward_funcs and not environment_rewards):
        reward_funcs, weights, kwargs, source = run_rewards(candidates, weights, kwargs, bool(environment_rewards))
    if weights is not None and environment_rewards:
        weights = list(weights) + [1.0] * len(environment_rewards)
    reward = CombinedReward(list(reward_funcs) + [fn for _, fn in environment_rewards], weights, kwargs or {},
                            device=device)
    names = list(reward_funcs) + [f"{name}.get_reward" for name, _ in environment_rewards]
    return reward, {"reward_funcs": names, "reward_source": source, "reward_weights": weights,
                    "reward_kwargs": kwargs or {}}


def run_config(candidates: list[Candidate]) -> tuple[Candidate, dict[str, Any]] | None:
    """The first adapter candidate whose run dir has a readable config.yaml, with its settings."""
    from rlhf.card import read_run_settings

    for candidate in candidates:
        if candidate.adapter_dir is not None:
            run = read_run_settings(candidate.adapter_dir)
            if run is not None:
                return candidate, run[1]
    return None


EPISODE_KEYS = ("tools", "environment_factory", "max_tool_calling_iterations", "tool_timeout", "chat_template",
                "chat_template_kwargs")


@dataclass
class EpisodeSettings:
    """The tools, environments and chat template an evaluation samples with (RLConfig's fields of
    the same names). ``source``: where they came from, for the printed line and the report."""

    tools: list[Any] = field(default_factory=list)
    environment_factory: Any = None
    max_tool_calling_iterations: int | None = None
    tool_timeout: float | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "given"

    @property
    def episodes(self) -> bool:
        return bool(self.tools) or self.environment_factory is not None

    @classmethod
    def resolve(cls, given: dict[str, Any], candidates: list[Candidate]) -> EpisodeSettings:
        """Each setting as given; unset ones are the run's own (the first checkpoint with a run
        config.yaml, like run_rewards), else RLConfig's defaults. The tools and environment come
        from the run only when neither is given (an empty ``tools`` list: one-turn responses)."""
        from rlhf.config import RLConfig

        defaults = {name: RLConfig.__dataclass_fields__[name] for name in EPISODE_KEYS}
        values = {name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                  for name, f in defaults.items()}
        run = run_config(candidates)
        from_run = given["tools"] is None and given["environment_factory"] is None and run is not None \
            and (bool(run[1].get("tools")) or run[1].get("environment_factory") is not None)
        if run is not None:
            values.update({name: run[1][name] for name in EPISODE_KEYS if name in run[1]})
            if not from_run:  # the run's tools do not join the given ones
                values.update(tools=[], environment_factory=None)
        values.update({name: value for name, value in given.items() if value is not None})
        source = f"the run's own, from the config.yaml next to {run[0].adapter_dir}" if from_run else "given"
        values["tools"] = [_importable(spec, "tools") for spec in values["tools"] or []]
        environment = values["environment_factory"]
        values["environment_factory"] = ({name: _importable(spec, "environment") for name, spec in environment.items()}
                                         if isinstance(environment, dict) else _importable(environment, "environment"))
        return cls(**values, source=source)

    def build(self, tokenizer: Any) -> ToolEpisodes | None:
        """Set the chat template on ``tokenizer`` (prompts use it too, as in training) and return
        the episodes' ToolEpisodes, or None for one-turn responses. ConfigError in one line for an
        unusable tool, environment or template."""
        from rlhf.episodes.chat import resolve_chat_template

        if self.chat_template is not None:
            tokenizer.chat_template = resolve_chat_template(self.chat_template)
        if not self.episodes:
            return None
        from rlhf.episodes import ToolEpisodes

        try:
            return ToolEpisodes(tokenizer, self.tools, self.environment_factory,
                                template_kwargs=self.chat_template_kwargs,
                                max_tool_calling_iterations=self.max_tool_calling_iterations,
                                tool_timeout=self.tool_timeout)
        except ConfigError as exc:
            if self.source == "given":
                raise
            # e.g. a file path the run gave relative to the directory it was started in
            raise ConfigError(f"{exc} ({self.source}; pass --tools / --environment to give them here)") from None

    def describe(self) -> str:
        parts = [f"tools {', '.join(map(str, map(_spec_text, self.tools)))}"] if self.tools else []
        if self.environment_factory is not None:
            parts.append(f"environment {_spec_text(self.environment_factory)}")
        return "; ".join(parts)

    def report_settings(self) -> dict[str, Any]:
        """report.json's settings for episodes (none for one-turn responses, whose report stays as it was)."""
        settings: dict[str, Any] = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        if self.episodes:
            settings["episodes"] = {
                "tools": [_spec_text(t) for t in self.tools],
                "environment_factory": _spec_text(self.environment_factory),
                "max_tool_calling_iterations": self.max_tool_calling_iterations, "tool_timeout": self.tool_timeout,
                "chat_template_kwargs": self.chat_template_kwargs, "source": self.source}
        return settings


def _importable(spec: Any, flag: str) -> Any:
    """A tool, environment or reward function as the loaders read it. A run given Python objects
    saved them as 'python:package.module.name' (rlhf.config): that is 'package.module:name'. One
    defined in a script run as __main__ or inside a function cannot be imported again."""
    if not (isinstance(spec, str) and spec.startswith("python:")):
        return spec
    module, _, name = spec.removeprefix("python:").rpartition(".")
    if not module or "<locals>" in spec or module == "__main__" or module.startswith("__main__."):
        raise ConfigError(f"the run's {flag} entry {spec} was a Python object defined where it cannot be imported "
                          f"again; pass --{flag} path/to/file.py:name")
    return f"{module}:{name}"


def _spec_text(spec: Any) -> Any:
    """A tool or environment as report.json writes it: its spec, or module.name of a Python object
    ({name: ...} for a mapping of environments; None stays None)."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        return {name: _spec_text(value) for name, value in spec.items()}
    return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', type(spec).__name__)}"
