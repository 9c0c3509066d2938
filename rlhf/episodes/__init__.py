"""Multi-turn episodes with tools and environments (issue 24), TRL's interface, token-exact.

- ``tools``: tools, environments, turn rewards, failures (TRL's ``tools=`` / ``environment_factory=``).
- ``chat``: what the chat template renders around sampled turns (prompt ids, tool-result tokens).
- ``sampling``: batched episode sampling with a KV cache carried across turns; ``pack_episodes``
  turns episodes into Rollout-shaped tensors (loss mask on sampled tokens, turn rewards on
  each turn's last sampled token).
- ``runner``: ``ToolEpisodes``, a run's tools + environments + template in one object.
- ``actions``: episode tensors reduced to the sampled tokens, so GAE and reward-to-go step over
  actions and treat tool tokens as part of the state.
"""

from rlhf.episodes.actions import action_order, compact_actions, expand_actions

from rlhf.episodes.chat import prepare_tool_template, render_ids, tool_suffix_ids
from rlhf.episodes.runner import SampledBatch, ToolEpisodes, episode_prompt
from rlhf.episodes.sampling import Episode, EpisodeBatch, draw, episode_metrics, pack_episodes, sample_episodes
from rlhf.episodes.tools import (EnvironmentPool, ToolOutcome, Toolbox, environment_tools, load_environment,
                                 load_object, load_tools, run_tool_calls, tool_schema)

__all__ = [
    "Episode", "EpisodeBatch", "action_order", "compact_actions", "expand_actions", "EnvironmentPool", "SampledBatch", "ToolEpisodes", "ToolOutcome", "Toolbox", "draw",
    "environment_tools", "episode_metrics", "episode_prompt", "load_environment", "load_object", "load_tools",
    "pack_episodes", "prepare_tool_template", "render_ids", "run_tool_calls", "sample_episodes", "tool_schema",
    "tool_suffix_ids",
]
