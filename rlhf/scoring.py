"""score(): the reward functions on a rollout -> outcome scores [B], process rewards [B, T] | None.

Also DAPO's two reward-side pieces (Yu et al. 2025): the soft overlong punishment and dynamic
sampling (``sample_with_spread``: sample more prompts until the batch holds enough groups whose
rewards differ).
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from rlhf.algorithms import zero_spread_groups
from rlhf.algorithms.advantages import normalize_then_sum
from rlhf.distributed import Reducer
from rlhf.errors import RewardError
from rlhf.rollout import Rollout, concat_rollouts
from rlhf.signals import ScoringInterrupted, run_abandonable

Scored = tuple[Rollout, Tensor, "Tensor | None", dict[str, float]]
# Added to the group ids of each further dynamic-sampling round (ids are prompt positions in one
# global batch, far below it), so groups of different rounds never merge.
ROUND_GROUP_STRIDE = 1_000_003


# Columns TRL does not pass to reward functions as keywords (it passes prompts/completions/ids itself).
NOT_REWARD_KEYWORDS = ("prompt", "completion", "completion_ids")


def completion_ids(rollout: Rollout) -> list[list[int]]:
    """Each response's token ids up to and including its EOS (TRL's ``completion_ids``; an
    episode's: all its tokens after the prompt, tool results included, as TRL's)."""
    lengths = rollout.span.sum(-1).long().tolist()
    return [row[:length].tolist() for row, length in zip(rollout.response_ids, lengths)]


def reward_inputs(rollout: Rollout) -> dict[str, Any]:
    """The keywords a reward call gets besides prompts and completions, as TRL passes them:
    completion_ids and every other dataset column."""
    columns = {name: values for name, values in rollout.columns.items() if name not in NOT_REWARD_KEYWORDS}
    if rollout.environments is not None:  # TRL passes each episode's environment instance
        columns["environments"] = rollout.environments
    return {"completion_ids": completion_ids(rollout), **columns}


@dataclass
class RewardTrainerState:
    """What TRL's ``trainer_state`` keyword offers reward functions for shaping over training."""

    global_step: int  # optimizer steps (RL steps) completed so far
    max_steps: int


def score(reward: Any, rollout: Rollout, config: Any, reducer: Reducer, step: int, tokenizer: Any = None,
          logged_columns: dict[str, list[Any]] | None = None,
          abandonable: Callable[[], ContextManager[Any]] = nullcontext,
          reward_columns: dict[str, list[float]] | None = None,
          raw_totals: list[float] | None = None) -> tuple[Tensor, Tensor | None, dict[str, float]]:
    """Outcome scores [B] from the reward functions (their weighted sum, or with reward_aggregation
    normalize_then_sum the weighted sum of their group-normalised values), minus the no-EOS and
    overlong penalties if set, clipped and normalised over the global batch when asked; process
    rewards [B, T] on the tokens they name (None when no function returned any). reward_mean/std in
    the metrics are of the plain weighted sum before clipping and normalising so runs stay comparable.

    A sample for which every function returned None (not applicable) is unscorable: its score is
    NaN, it is left out of every statistic here, and ``fill_unscorable`` gives the update a
    neutral value for it and drops it from the loss.

    ``reward_columns`` receives each function's unweighted value per sample (NaN = None) and
    ``raw_totals`` each sample's reward as reward_mean counts it (penalties and process rewards
    in, before clipping and normalising), for samples.jsonl and the completion tables.
    """
    logged: dict[str, list[float]] = {}

    def log_metric(name: str, value: float) -> None:  # TRL's hooks for reward functions
        logged.setdefault(name, []).append(float(value))

    def log_extra(column: str, values: list[Any]) -> None:  # extra per-sample columns (samples.jsonl)
        if logged_columns is not None:
            logged_columns.setdefault(column, []).extend(values)

    # In training a signal now abandons the step (rlhf.signals.StopOnSignal), on every process.
    output, interrupted = run_abandonable(
        lambda: reward(rollout.prompts, rollout.completions, **reward_inputs(rollout),
                       trainer_state=RewardTrainerState(step - 1, config.max_steps), log_metric=log_metric,
                       log_extra=log_extra),
        abandonable, reducer.max)
    if interrupted:
        raise ScoringInterrupted(f"step {step}")
    device = rollout.mask.device
    scores = torch.tensor(output.total, dtype=torch.float32, device=device)
    unscorable = torch.tensor(output.unscorable or [False] * len(scores), dtype=torch.bool, device=device)
    token_scores = None
    if output.steps is not None:
        if rollout.episode_mask is not None:
            # Character positions index one text; an episode is several messages with tool results
            # between them, and a position could land on a tool token (no action to credit).
            raise RewardError("a reward function returned process rewards ((position, reward) pairs), which do not "
                              "apply to multi-turn episodes; return one number per episode, or give turn rewards "
                              "from the tools ({'observation': ..., 'reward': r})")
        token_scores = process_rewards_to_tokens(output.steps, rollout, tokenizer)
    if rollout.turn_rewards is not None and bool(rollout.turn_rewards.any()):
        # an environment's turn rewards take the per-token path, each on its turn's last sampled token
        token_scores = rollout.turn_rewards if token_scores is None else token_scores + rollout.turn_rewards
    penalties = torch.zeros_like(scores)  # taken again from a normalize_then_sum score below
    if config.missing_eos_penalty is not None:
        penalty = config.missing_eos_penalty * (~rollout.eos_found).float()
        scores, penalties = scores - penalty, penalties + penalty
    metrics: dict[str, float] = {}
    if config.overlong_buffer_length:
        penalty = overlong_penalty(rollout.span.sum(-1), config.max_new_tokens, config.overlong_buffer_length,
                                   config.overlong_penalty_factor)
        scores, penalties = scores - penalty, penalties + penalty
        metrics["overlong_penalty_mean"] = reducer.mean(penalty.mean())
    scorable = reducer.gather((~unscorable).float()) > 0  # gloo gathers no bools
    unscorable_count = float((~scorable).sum())
    if unscorable_count:
        first = int(unscorable.nonzero()[0]) if bool(unscorable.any()) else None
        where = f" (here: completion {str(rollout.completions[first])[:50]!r})" if first is not None else ""
        warnings.warn(f"step {step}: every reward function returned None (not applicable) for "
                      f"{int(unscorable_count)} samples{where}; they are left out of the update and of reward_mean",
                      stacklevel=2)
    # Logged totals include the process rewards; the update gets those token by token.
    totals = scores if token_scores is None else scores + token_scores.sum(-1)
    if raw_totals is not None:
        raw_totals.extend(totals.masked_fill(unscorable, math.nan).tolist())
    all_scores = reducer.gather(totals)[scorable]
    errors = float(reducer.sum(float(sum(output.failed))))
    if errors and config.reward_error == "zero":
        warnings.warn(f"step {step}: {int(errors)} samples failed a reward function and score 0 "
                      "(reward_error: zero)", stacklevel=2)
    metrics.update({"reward_errors": errors, "reward_unscorable": unscorable_count,
                    "reward_mean": float(all_scores.mean()) if all_scores.numel() else math.nan,
                    "reward_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0})
    for name, values in output.components.items():  # None (NaN here) is not part of a function's mean
        if reward_columns is not None:
            reward_columns.setdefault(name, []).extend(values)
        metrics.update(function_reward_stats(name, torch.tensor(values, dtype=torch.float32, device=device), reducer))
    if config.reward_aggregation == "normalize_then_sum":  # reward_mean and the columns above stay the plain sum
        aggregated, aggregation_metrics = group_normalized_scores(output, rollout.group_ids, config, reducer)
        scores = aggregated - penalties
        metrics.update(aggregation_metrics)
    # Clipping and normalising act on the outcome scores alone. Gathered on every process even
    # without process rewards: some processes may have them and others not, and a gather is a
    # collective that all of them must make.
    all_scores = reducer.gather(scores)[scorable]
    if config.reward_clip is not None:
        metrics["reward_clip_frac"] = float((all_scores.abs() > config.reward_clip).float().mean())
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
        all_scores = all_scores.clamp(-config.reward_clip, config.reward_clip)
    if config.normalize_rewards:
        scores = (scores - all_scores.mean()) / (all_scores.std() + 1e-6) if all_scores.numel() > 1 else scores * 0
    # once every metric of scoring is in (reward_clip_frac, the aggregation's): none is replaced
    for name, values in logged.items():  # this process's values (the main process's are logged)
        if name in metrics:
            raise logged_over_a_trainer_metric(name)
        metrics[name] = sum(values) / len(values)
    metrics[LOGGED_BY_REWARDS] = sorted(logged)
    return scores.masked_fill(unscorable, math.nan), token_scores, metrics


# Key of score()'s metrics naming those a reward function logged (log_metric); the trainer takes it out
LOGGED_BY_REWARDS = "_logged_by_rewards"


def logged_over_a_trainer_metric(name: str) -> RewardError:
    """A reward function's log_metric under a name the trainer logs itself would replace (or be
    replaced by) the trainer's value, silently: refused."""
    return RewardError(f"a reward function logged {name!r} with log_metric, a metric the trainer logs itself; "
                       f"give it a name of its own (e.g. 'reward_fn/{name}')")


def function_reward_stats(name: str, values: Tensor, reducer: Reducer, prefix: str = "rewards") -> dict[str, float]:
    """TRL's rewards/<name>/mean and /std of one function's values [B] (NaN = not applicable, left
    out) over all processes; the std with Bessel's correction, as TRL's nanstd."""
    gathered = reducer.gather(values.to(torch.float32))
    kept = gathered[~gathered.isnan()].double()
    return {f"{prefix}/{name}/mean": float(kept.mean()) if kept.numel() else math.nan,
            f"{prefix}/{name}/std": float(kept.std()) if kept.numel() > 1 else math.nan}


def group_normalized_scores(output: Any, group_ids: Tensor, config: Any,
                            reducer: Reducer) -> tuple[Tensor, dict[str, float]]:
    """reward_aggregation normalize_then_sum (GDPO, TRL's multi_objective_aggregation): each
    function's values normalised within each group, then weighted and summed -> scores [B], plus
    advantages/<name>/mean and /std of each function's normalised values (NaN left out, as in
    rewards/<name>/mean): how much each one moves the advantage before its weight.

    output: the RewardOutput of one batch; group_ids: [B]. Process rewards have no per-response
    value to normalise within a group: a function that returns them is refused (on every process,
    so none waits in a later collective).
    """
    if reducer.max(float(output.steps is not None)) > 0:
        raise RewardError("reward_aggregation normalize_then_sum normalises one value per response and function; "
                          "a reward function returned process rewards (steps): use reward_aggregation sum")
    names = list(output.components)
    device = group_ids.device
    weights = torch.tensor(config.reward_weights or [1.0] * len(names), dtype=torch.float32, device=device)
    rewards = torch.tensor([output.components[name] for name in names], dtype=torch.float32, device=device).T
    aggregated, normalized = normalize_then_sum(rewards, weights, group_ids)
    metrics: dict[str, float] = {}
    for k, name in enumerate(names):
        metrics.update(function_reward_stats(name, normalized[:, k], reducer, prefix="advantages"))
    return aggregated, metrics


def fill_unscorable(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Scores [B] with NaN for unscorable samples -> (scores with each NaN replaced by the mean of
    the scorable samples of its group, or 0 when the group has none; bool [B] scorable).

    The fill leaves a group's mean, and so every other sample's group-relative advantage under
    mean baselines, unchanged; the sample itself is dropped from the loss by the caller (TRL
    likewise excludes such rows from the baseline and zeroes their advantage).
    """
    scorable = ~scores.isnan()
    if bool(scorable.all()):
        return scores, scorable
    _, group = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(group.max()) + 1, dtype=scores.dtype, device=scores.device)
    total = torch.zeros_like(count)
    count.index_add_(0, group, scorable.to(scores.dtype))
    total.index_add_(0, group, torch.where(scorable, scores, torch.zeros_like(scores)))
    group_mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return torch.where(scorable, scores, group_mean[group]), scorable


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer_length: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, float32 [B] (subtracted from the score).

    lengths: [B] response tokens. With L = max_new_tokens and C = buffer_length:
    penalty = 0 for |y| <= L - C;   factor * (|y| - (L - C)) / C in the last C tokens (up to factor at L).
    """
    start = max_new_tokens - buffer_length
    return factor * ((lengths.float() - start) / buffer_length).clamp(min=0.0, max=1.0)


def process_rewards_to_tokens(steps: list[list[tuple[int, float]]], rollout: Rollout, tokenizer: Any) -> Tensor:
    """Per-sample (char_position, reward) pairs -> [B, T] float32 rewards on the completion tokens.

    A pair lands on the first token whose decoded prefix is longer than char_position, i.e. the
    token that writes that character; positions at or past the end go to the last real token.
    Each lookup is a binary search over decoded prefixes (about log2(T) decodes per pair).
    """
    token_scores = torch.zeros(rollout.mask.shape, dtype=torch.float32, device=rollout.mask.device)
    for row, pairs in enumerate(steps):
        length = int(rollout.mask[row].sum())
        if not pairs or length == 0:
            continue
        ids = rollout.response_ids[row, :length].tolist()
        decoded: dict[int, int] = {}

        def prefix_chars(tokens: int) -> int:
            if tokens not in decoded:
                decoded[tokens] = len(tokenizer.decode(ids[:tokens], skip_special_tokens=True))
            return decoded[tokens]

        for position, value in pairs:
            # smallest k >= 1 with prefix_chars(k) > position; token k - 1 writes that character
            k = bisect.bisect_right(range(1, length + 1), position, key=prefix_chars) + 1
            token_scores[row, min(k, length) - 1] += value
    return token_scores


def sample_with_spread(sample: Callable[[], Rollout], score_rollout: Callable[[Rollout], tuple[Tensor, Any, dict]],
                       groups_needed: int, max_rounds: int, reducer: Reducer, pad_token_id: int) -> Scored:
    """DAPO dynamic sampling: keep sampling prompt batches until this process holds groups_needed
    groups whose rewards differ (every process, so all run the same rounds), at most max_rounds.

    Returns the first groups_needed spread groups (topped up with zero-spread groups when the
    rounds run out; the update drops those, as filter_zero_std_groups does), their scores and
    process rewards, and the first round's reward metrics (the policy on fresh prompts) with
    reward_errors summed over all rounds, plus dynamic_sampling/rounds and
    dynamic_sampling/missing_groups (global).
    """
    spread_parts: list[tuple[Rollout, Tensor, Tensor | None]] = []
    flat_parts: list[tuple[Rollout, Tensor, Tensor | None]] = []
    first_metrics: dict[str, float] = {}
    have, rounds, errors = 0, 0, 0.0
    while rounds < max_rounds:
        if rounds and have < groups_needed:
            # joined parts keep none of the sampler's products (concat_rollouts), so a process still
            # short of groups would hand an earlier round's to the update only if the rounds ran out
            # with no later spread group and one part of that round filled its batch: they go now
            # rather than hold their memory (logits included) through the next round's sampling
            kept = {id(part.sampled_products): part.sampled_products for part, _, _ in spread_parts + flat_parts
                    if part.sampled_products is not None}
            for products in kept.values():
                products.release()
            for part, _, _ in spread_parts + flat_parts:
                part.sampled_products = part.product_rows = None
        rollout = sample()
        scores, token_scores, metrics = score_rollout(rollout)
        first_metrics = first_metrics or metrics
        errors += metrics.get("reward_errors", 0.0)  # any round's failures count (reward_error: skip_batch)
        rollout.group_ids = rollout.group_ids + rounds * ROUND_GROUP_STRIDE  # each round's prompts are new groups
        filled, _ = fill_unscorable(scores, rollout.group_ids)
        zero = zero_spread_groups(filled + (token_scores.sum(-1) if token_scores is not None else 0.0), rollout.group_ids)
        for keep, parts in ((~zero, spread_parts), (zero, flat_parts)):
            rows = keep.nonzero().flatten().tolist()
            if rows:
                parts.append((rollout.select(rows), scores[rows], token_scores[rows] if token_scores is not None else None))
        have = sum(len(torch.unique(part[0].group_ids)) for part in spread_parts)
        rounds += 1
        if reducer.max(float(groups_needed - have)) <= 0:
            break
    chosen = _first_groups(spread_parts, groups_needed) + _first_groups(flat_parts, max(groups_needed - have, 0))
    rollout = concat_rollouts([part[0] for part in chosen], pad_token_id)
    scores = torch.cat([part[1] for part in chosen])
    token_parts = [part[2] for part in chosen]
    token_scores = None
    if any(t is not None for t in token_parts):
        width = rollout.response_length
        token_scores = torch.cat([torch.nn.functional.pad(t if t is not None else torch.zeros_like(p[0].mask),
                                                          (0, width - p[0].response_length))
                                  for t, p in zip(token_parts, chosen)])
    missing = float(reducer.sum(float(max(groups_needed - have, 0))))
    return rollout, scores, token_scores, {**first_metrics, "reward_errors": errors,
                                           "dynamic_sampling/rounds": float(rounds),
                                           "dynamic_sampling/missing_groups": missing}


def _first_groups(parts: list[tuple[Rollout, Tensor, Tensor | None]],
                  count: int) -> list[tuple[Rollout, Tensor, Tensor | None]]:
    """The rows of the first ``count`` groups (in sampling order) of a list of scored parts."""
    chosen = []
    for rollout, scores, token_scores in parts:
        if count <= 0:
            break
        groups = list(dict.fromkeys(rollout.group_ids.tolist()))[:count]
        rows = [i for i, g in enumerate(rollout.group_ids.tolist()) if g in set(groups)]
        chosen.append((rollout.select(rows), scores[rows], token_scores[rows] if token_scores is not None else None))
        count -= len(groups)
    return chosen
