"""One object that holds a run's tools, environments and template, and samples a batch of rows.

    episodes = ToolEpisodes(tokenizer, tools=[calculator])
    batch = episodes.sample(model, rows, max_completion_length=256, temperature=1.0, top_p=1.0,
                            stop_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    batch.episodes[0].messages    # TRL's conversational completion, tool calls and results included
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.config import check_episode_limits
from rlhf.episodes.chat import Messages, prepare_tool_template, render_ids
from rlhf.episodes.sampling import Episode, pack_episodes, sample_episodes
from rlhf.episodes.tools import EnvironmentPool, Factory, Tool, Toolbox, environment_tools, load_environment, load_tools
from rlhf.errors import ConfigError, DataError


@dataclass
class SampledBatch:
    episodes: list[Episode]
    environments: list[Any] | None   # the instance each episode ran in (reward functions get them as ``environments``)


def episode_prompt(prompt: Any, observation: str | None) -> Messages:
    """A row's prompt as messages with the environment's reset observation appended to the last
    message's text (TRL). A plain-string prompt becomes one user message; no prompt (a dataset
    that only names environments) an empty one, as TRL allows with an environment."""
    if prompt is None:
        messages: Messages = [{"role": "user", "content": ""}]
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise DataError(f"a prompt must be a string or a list of {{role, content}} messages, got {str(prompt)[:60]!r}")
    if observation:
        last = messages[-1]
        messages[-1] = {**last, "content": f"{last.get('content') or ''}{observation}"}
    return messages


class ToolEpisodes:
    """A run's tools and environments, ready to sample episodes (TRL's ``tools`` / ``environment_factory``).

    ``tools``: functions or ``file.py:name`` / ``module:name`` specs; ``environment_factory``: a
    factory, a spec, or {name: factory or spec}. ``chat_template``: a tool-capable template to use
    instead of the tokenizer's (set on it). ``max_tool_calling_iterations`` (None: no limit) and
    ``tool_timeout`` (seconds per call, None: none) as in rlhf.episodes.sampling / tools.
    ConfigError in one line for anything unusable, before any sampling.
    """

    def __init__(self, tokenizer: Any, tools: list[str | Tool] | None = None,
                 environment_factory: str | Factory | dict[str, str | Factory] | None = None, *,
                 chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None,
                 max_tool_calling_iterations: int | None = None, tool_timeout: float | None = None):
        if not tools and environment_factory is None:
            raise ConfigError("episodes need tools or an environment_factory")
        check_episode_limits(max_tool_calling_iterations, tool_timeout)
        self.tokenizer = tokenizer
        self.tools = load_tools(list(tools or []))
        self.pool = EnvironmentPool(load_environment(environment_factory)) if environment_factory is not None else None
        self.chat_template = prepare_tool_template(tokenizer, chat_template)
        self.template_kwargs = dict(template_kwargs or {})
        self.max_tool_calling_iterations = max_tool_calling_iterations
        self.tool_timeout = tool_timeout
        self.schema_cache: dict[Any, dict[str, Any]] = {}
        # every tool and environment method described once now: a missing docstring fails here
        for instances in (self.pool.pool.values() if self.pool else [[None]]):
            self.toolbox(instances[0])

    def toolbox(self, environment: Any | None) -> Toolbox:
        """The tools of an episode run in ``environment`` (None: the standalone tools only)."""
        methods = environment_tools(environment) if environment is not None else []
        return Toolbox(self.tools + methods, self.schema_cache)

    def reward_functions(self) -> list[tuple[str, Any]]:
        """The environments' ``get_reward`` as (name, reward function) pairs (none without environments)."""
        return self.pool.reward_functions() if self.pool else []

    def start(self, rows: list[dict[str, Any]],
              prompt_column: str = "prompt") -> tuple[list[Messages], list[Toolbox], list[Any] | None]:
        """Prompts, toolboxes and environment instances (reset with their row) for ``rows``."""
        if self.pool is None:
            prompts = [episode_prompt(row.get(prompt_column), None) for row in rows]
            return prompts, [self.toolbox(None)] * len(rows), None
        environments = self.pool.take(self.pool.names(rows))
        prompts = [episode_prompt(row.get(prompt_column), self.pool.reset(env, row))
                   for env, row in zip(environments, rows)]
        return prompts, [self.toolbox(env) for env in environments], environments

    def check_dataset(self, dataset: Any, name: str) -> None:
        """With several environments, every row of ``dataset`` must name one of them in its
        ``environment`` column (DataError / ConfigError in one line, before training starts)."""
        if self.pool is None or not self.pool.multi:
            return
        if "environment" not in dataset.column_names:
            raise ConfigError(f"environment_factory maps names to environments ({', '.join(map(str, self.pool.factories))}), "
                              f"so every row of {name} needs an 'environment' column naming one; it has none")
        self.pool.names([{"environment": value} for value in dict.fromkeys(dataset["environment"])])

    def prompt_length(self, row: dict[str, Any], prompt_column: str = "prompt") -> int:
        """Tokens of a row's prompt as an episode renders it (the tools' schemas included; an
        environment's reset observation is not known before the episode and is left out)."""
        instance = None
        if self.pool is not None:
            (name,) = self.pool.names([row])
            instance = self.pool.pool[name][0]
        toolbox = self.toolbox(instance)
        return len(render_ids(self.tokenizer, episode_prompt(row.get(prompt_column), None), tools=toolbox.schemas,
                              chat_template=self.chat_template, add_generation_prompt=True,
                              template_kwargs=self.template_kwargs))

    def sample(self, model: Any, rows: list[dict[str, Any]], *, prompt_column: str = "prompt",
               started: tuple[list[Messages], list[Toolbox], list[Any] | None] | None = None,
               **sampling: Any) -> SampledBatch:
        """One episode per row; ``sampling``: sample_episodes' keywords (max_completion_length,
        temperature, top_p, stop_ids, pad_token_id, max_prompt_length, uniforms, row_seeds, ...).
        ``started``: what ``start`` returned for these rows (a batch sampled in chunks starts all
        its rows first, so each row keeps its own environment instance until it is scored)."""
        prompts, toolboxes, environments = started if started is not None else self.start(rows, prompt_column)
        episodes = sample_episodes(
            model, self.tokenizer, prompts, toolboxes, chat_template=self.chat_template,
            template_kwargs=self.template_kwargs, max_tool_calling_iterations=self.max_tool_calling_iterations,
            tool_timeout=self.tool_timeout, **sampling)
        return SampledBatch(episodes=episodes, environments=environments)


def sample_episode_rollout(episodes: ToolEpisodes, model: Any, rows: list[dict[str, Any]], *, prompt_column: str,
                           group_ids: list[int], columns: dict[str, list[Any]], max_completion_length: int,
                           max_prompt_length: int | None, temperature: float, top_p: float, stop_ids: list[int],
                           share_prompt_prefix: bool = False, row_seeds: list[int] | None = None,
                           started: tuple[list[Messages], list[Toolbox], list[Any] | None] | None = None,
                           fast_forward: Any = None) -> Any:
    """One episode per row as a rlhf.rollout.Rollout: the response is the whole episode (sampled
    turns and tool tokens; ``mask`` 1 on sampled tokens only, ``episode_mask`` on all of them),
    prompts are the rows' messages with the reset observation, completions TRL's conversational
    form (assistant messages with their tool calls, tool messages), turn rewards per token.
    ``fast_forward``: a ``rlhf.sampling_forward.SamplingForward`` of ``model``, run in its place."""
    from rlhf.rollout import Rollout

    tokenizer = episodes.tokenizer
    device = next(model.parameters()).device
    sampled = episodes.sample(model, rows, prompt_column=prompt_column, max_completion_length=max_completion_length,
                              temperature=temperature, top_p=top_p, stop_ids=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, max_prompt_length=max_prompt_length,
                              share_prompt_prefix=share_prompt_prefix, row_seeds=row_seeds, started=started,
                              fast_forward=fast_forward)
    batch = pack_episodes(sampled.episodes, tokenizer.pad_token_id, device)
    return Rollout(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, response_ids=batch.response_ids,
        mask=batch.mask, eos_found=batch.eos_found,
        group_ids=torch.tensor(group_ids, dtype=torch.long, device=device),
        prompts=[e.prompt for e in sampled.episodes], completions=[e.messages for e in sampled.episodes],
        columns=columns, sampler_logprobs=batch.sampler_logprobs, episode_mask=batch.episode_mask,
        turn_rewards=batch.token_rewards, episodes=sampled.episodes, environments=sampled.environments,
    )
