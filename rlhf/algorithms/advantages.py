"""Advantage estimators, reward shaping into per-token rewards, the REINFORCE baseline, and the
aggregation of several reward functions into one score (GDPO)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import masked_sum, masked_whiten, power_of_two_scale
from rlhf.algorithms.registry import Registry, variant

ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator", inputs=("token_rewards", "mask", "values", "group_ids", "baseline", "all_reduce"))


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row, [B] long (0 for rows without real tokens).

    mask: [B, T].
    """
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=-1).values


def token_level_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Spread sequence scores [B] into per-token rewards [B, T] (float32), Ziegler et al. 2019.

    r_{i,t} = -kl_coef * kl_{i,t} * mask_{i,t}  +  scores_i * [t == last real token of row i]
    Rows with no real token receive nothing (there is no action to credit).
    """
    mask_f = mask.float()
    rewards = torch.zeros_like(mask_f)
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * kl.float() * mask_f
    last = last_token_index(mask)
    has_tokens = mask_f.sum(-1) > 0
    score_at_last = torch.zeros_like(mask_f).scatter(
        1, last.unsqueeze(1), (scores.float() * has_tokens.float()).unsqueeze(1)
    )
    return rewards + score_at_last


class MovingAverageBaseline:
    """Exponential moving average of batch returns, the classic REINFORCE baseline b.

    value = 0.0 before the first update; the first update sets value = mean(batch_returns);
    later updates: value <- decay * value + (1 - decay) * mean(batch_returns).
    Use ``value`` for a batch *before* calling ``update`` with that batch, so the baseline never
    depends on the sample it is subtracted from (keeps the gradient estimate unbiased).
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value = 0.0
        self.initialized = False

    def update(self, batch_returns: Tensor | list[float] | float) -> None:
        batch_mean = float(torch.as_tensor(batch_returns, dtype=torch.float32).mean())
        if not self.initialized:
            self.value = batch_mean
            self.initialized = True
        else:
            self.value = self.decay * self.value + (1.0 - self.decay) * batch_mean

    def state_dict(self) -> dict:
        return {"value": self.value, "initialized": self.initialized, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.initialized = bool(state["initialized"])


# ----------------------------------------------------------------------------------------------
# Advantage estimators:  fn(token_rewards, mask, *, <only what it reads>) -> (advantages [B, T], returns [B, T])
# The trainer offers: values [B, T] (needs values=True), group_ids [B] (groups=True), baseline
# (the moving average), all_reduce (sum over processes), and the hyperparameters gamma, lam plus
# advantage_kwargs. Keyword parameters with defaults are the estimator's hyperparameters.
# ----------------------------------------------------------------------------------------------


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go G_t = sum_{l >= t} gamma^(l - t) r_l over real tokens, float32 [B, T].

    token_rewards, mask: [B, T]. Padding contributes no reward and is 0 in the output.
    """
    mask_f = mask.float()
    rewards = token_rewards.float() * mask_f
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask_f


def sequence_scores(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """Total reward of each sequence s_i = sum_t r_{i,t} * mask_{i,t}, float32 [B]."""
    return masked_sum(token_rewards, mask, dim=-1)


def group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample statistics of each sample's group, each float32 [B].

    scores: [B]; group_ids: [B] ints (any values, groups may differ in size).
    Returns (group_sum, group_count, group_std) broadcast back to samples; std is unbiased
    (torch.std default) and 0 for groups of one sample.
    """
    scores = scores.float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(n_groups, dtype=torch.float32, device=scores.device).index_add(0, inverse, scores)
    counts = torch.zeros(n_groups, dtype=torch.float32, device=scores.device).index_add(
        0, inverse, torch.ones_like(scores)
    )
    means = sums / counts
    sq_dev = (scores - means[inverse]) ** 2
    sum_sq = torch.zeros(n_groups, dtype=torch.float32, device=scores.device).index_add(0, inverse, sq_dev)
    stds = torch.where(counts > 1, (sum_sq / (counts - 1).clamp(min=1.0)).sqrt(), torch.zeros_like(sums))
    return sums[inverse], counts[inverse], stds[inverse]


def zero_spread_groups(scores: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """Bool [B]: True for samples whose group's scores are all equal (std <= eps).

    scores, group_ids: [B]. Such groups get zero group-relative advantage and carry no signal
    (DAPO's dynamic sampling drops them). Groups of one sample count as zero-spread.
    """
    _, _, stds = group_stats(scores, group_ids)
    return stds <= eps


@ADVANTAGE_ESTIMATORS.register("reinforce")
def reinforce_advantages(
    token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, baseline: float = 0.0
) -> tuple[Tensor, Tensor]:
    """REINFORCE with a baseline (Williams 1992): A_t = G_t - b.

    G_t = sum_{l >= t} gamma^(l - t) r_l over real tokens; b = ``baseline``, the moving average
    of earlier batches' returns (value *before* this batch updates it).
    token_rewards, mask: [B, T] -> advantages [B, T], returns G [B, T] (float32, 0 on padding).
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    advantages = (returns - float(baseline)) * mask.float()
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register("gae", values=True)
def gae_advantages(
    token_rewards: Tensor, mask: Tensor, *, values: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) on response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t         with V = 0 after the last real token
    A_t     = sum_{l >= 0} (gamma * lam)^l delta_{t+l}
    returns = A + V                               (the critic's regression target)
    token_rewards, values, mask: [B, T] -> advantages [B, T], returns [B, T] (float32).
    """
    mask_f = mask.float()
    rewards = token_rewards.float() * mask_f
    values_f = values.float() * mask_f
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values_f[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values_f[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask_f
    returns = (advantages + values_f) * mask_f
    return advantages, returns


# TRL's scale_rewards values; its booleans mean True = group, False = none.
SCALE_REWARDS = ("group", "batch", "none")


def scale_rewards_mode(scale_rewards: bool | str) -> str:
    """group | batch | none from a scale_rewards setting (TRL's True / False accepted)."""
    if scale_rewards is True or scale_rewards is False:
        return "group" if scale_rewards else "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (or true / false), "
                         f"got {scale_rewards!r}")
    return scale_rewards


def batch_std(scores: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Unbiased std of scores [B] over the whole batch, float32 scalar (0 for fewer than 2 samples).

    all_reduce (a sum over processes) makes it the std of the global batch. Two reductions, mean
    first: the one-pass E[s^2] - E[s]^2 loses the spread in float32 when the mean is large.
    """
    scores = scores.float()
    stats = torch.stack([scores.sum(), torch.tensor(float(scores.numel()), device=scores.device)])
    total, count = (all_reduce(stats) if all_reduce is not None else stats).tolist()
    if count < 2:
        return torch.zeros((), dtype=torch.float32, device=scores.device)
    sum_sq = ((scores - total / count) ** 2).sum().reshape(1)
    sum_sq = all_reduce(sum_sq) if all_reduce is not None else sum_sq
    return (sum_sq[0] / (count - 1)).sqrt()


@ADVANTAGE_ESTIMATORS.register("grpo", groups=True)
def grpo_advantages(
    token_rewards: Tensor, mask: Tensor, *, group_ids: Tensor, eps: float = 1e-6, scale_rewards: bool | str = True,
    all_reduce: Callable[[Tensor], Tensor] | None = None, _rescaled: bool = False,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath).

    s_i = sum_t r_{i,t};  A_i = (s_i - mean_{j in g(i)} s_j) / (std + eps), std by scale_rewards (TRL's):
      group (or True)   std_{j in g(i)} s_j, i's group; a group of one sample gets A = 0
      batch             std_j s_j over the whole batch, every process's samples (``all_reduce``,
                        a sum over processes; None = this tensor is the whole batch): Lite PPO
                        (arXiv 2508.08221)
      none (or False)   no division: Dr. GRPO
    stds unbiased. A_i is broadcast over row i's real tokens.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """
    mode = scale_rewards_mode(scale_rewards)
    if mode != "none" and not eps > 0:  # a group of equal rewards would give 0 / 0
        raise ValueError(f"grpo: eps must be > 0 when dividing by a std, got {eps}")
    scores = sequence_scores(token_rewards, mask)
    group_sum, group_count, group_std = group_stats(scores, group_ids)
    seq_adv = scores - group_sum / group_count
    if mode != "none":
        spread = group_std if mode == "group" else batch_std(scores, all_reduce)
        if not bool(torch.isfinite(spread).all()) and not _rescaled and _finite_everywhere(scores, mode, all_reduce):
            # scores beyond ~1e19 square past float32's range: the stds would be inf and every
            # advantage silently 0. The same advantages of the scores times a power of two (exact)
            # that brings them within [-1, 1]; only these steps take this path
            scale = power_of_two_scale(scores, all_reduce=all_reduce if mode == "batch" else None)
            return grpo_advantages(token_rewards * scale, mask, group_ids=group_ids, eps=eps,
                                   scale_rewards=scale_rewards, all_reduce=all_reduce, _rescaled=True)
        seq_adv = seq_adv / (spread + eps)
    advantages = seq_adv.unsqueeze(1) * mask.float()
    return advantages, advantages.clone()


def _finite_everywhere(scores: Tensor, mode: str, all_reduce: Callable[[Tensor], Tensor] | None) -> bool:
    """Every score finite: this process's (group mode), every process's (batch mode: all decide alike)."""
    bad = (~torch.isfinite(scores)).sum().reshape(1).float()
    if mode == "batch" and all_reduce is not None:
        bad = all_reduce(bad)
    return float(bad[0]) == 0


dr_grpo_advantages = ADVANTAGE_ESTIMATORS.register("dr_grpo", groups=True)(variant(
    grpo_advantages, "dr_grpo_advantages", scale_rewards=False, doc="""Dr. GRPO (Liu et al. 2025): group-mean baseline without the std division.

    A_i = s_i - mean_{j in g(i)} s_j, broadcast over real tokens (grpo_advantages with
    scale_rewards=False). Dividing by the std favours questions that are too easy or too hard;
    dropping it removes that difficulty bias.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """))


@ADVANTAGE_ESTIMATORS.register("rloo", groups=True)
def rloo_advantages(token_rewards: Tensor, mask: Tensor, *, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024).

    The whole response is one action: A_i = s_i - (sum_{j in g(i), j != i} s_j) / (k - 1),
    k = size of i's group; a group of one sample has no baseline and gets A = 0.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """
    scores = sequence_scores(token_rewards, mask)
    group_sum, group_count, _ = group_stats(scores, group_ids)
    leave_one_out = (group_sum - scores) / (group_count - 1).clamp(min=1.0)
    seq_adv = torch.where(group_count > 1, scores - leave_one_out, torch.zeros_like(scores))
    advantages = seq_adv.unsqueeze(1) * mask.float()
    return advantages, advantages.clone()


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, eps: float = 1e-8,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): reward-to-go whitened over the whole batch.

    G_t = sum_{l >= t} gamma^(l - t) r_l (token rewards already carry the per-token KL);
    A = masked_whiten(G, mask) — the batch statistics act as the baseline, no critic, no groups.
    The batch is the global one: ``all_reduce`` (a sum over processes) makes the statistics those
    of every process's tokens, as in OpenRLHF; None = this tensor is the whole batch.
    token_rewards, mask: [B, T] -> advantages [B, T], returns G [B, T] (float32).
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    advantages = masked_whiten(returns, mask, eps=eps, all_reduce=all_reduce)
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", groups=True)
def reinforce_pp_baseline_advantages(
    token_rewards: Tensor, mask: Tensor, *, group_ids: Tensor, eps: float = 1e-8,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu 2025, REINFORCE++, arXiv 2501.03262): group-mean baseline, then
    whitening over the whole batch's tokens instead of a per-group std.

    s_i = sum_t r_{i,t} (the per-token KL in the reward included);  b_i = mean_{j in g(i)} s_j,
    b_i = 0 for a group of one sample (verl);  A_{i,t} = masked_whiten(s_i - b_i) over every real
    token of the batch: (x - mean) / sqrt(var + eps), var unbiased. The group mean removes the
    prompt's difficulty; the batch std keeps the scale of easy and hard prompts comparable, which
    GRPO's per-group std does not (a group of near-equal rewards is blown up).
    The batch is the global one: ``all_reduce`` (a sum over processes) makes the statistics those
    of every process's tokens, as verl (one driver) and OpenRLHF compute them; None = this tensor
    is the whole batch.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """
    scores = sequence_scores(token_rewards, mask)
    group_sum, group_count, _ = group_stats(scores, group_ids)
    baseline = torch.where(group_count > 1, group_sum / group_count, torch.zeros_like(scores))
    centred = (scores - baseline).unsqueeze(1) * mask.float()
    advantages = masked_whiten(centred, mask, eps=eps, all_reduce=all_reduce)
    return advantages, advantages.clone()


# ----------------------------------------------------------------------------------------------
# Several reward functions -> one score (rlhf.scoring applies it before the estimator)
# ----------------------------------------------------------------------------------------------


def normalize_then_sum(rewards: Tensor, weights: Tensor, group_ids: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """GDPO's aggregation (arXiv 2601.05242; TRL's multi_objective_aggregation normalize_then_sum):
    each reward function normalised within each group, then the weighted sum.

    rewards: [B, K] float, one column per function, NaN where it returned None (not applicable);
    weights: [K]; group_ids: [B].
    z_{i,k} = (r_{i,k} - mean_{j in g(i)} r_{j,k}) / (std_{j in g(i)} r_{j,k} + eps)
              mean and std (unbiased) over the group's samples where function k applies;
    R_i     = sum_k w_k z_{i,k}, a z that is NaN counting 0 (TRL's nansum).
    z is NaN where r is NaN and for every sample of a group in which fewer than 2 samples have a
    value for k (no spread to normalise by, as TRL's nanstd). Normalising each function before the
    sum keeps a function with a large spread from drowning the others, and distinct combinations
    of rewards (1, 0) and (0, 1) from collapsing into one advantage as they do under a plain sum.
    Returns (R [B] float32, z [B, K] float32).
    """
    values = rewards.float()
    present = ~values.isnan()
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    shape = (n_groups, values.shape[1])
    zero = torch.zeros(shape, dtype=torch.float32, device=values.device)
    counts = zero.index_add(0, group, present.float())
    sums = zero.index_add(0, group, torch.where(present, values, 0.0))
    means = sums / counts  # NaN for a function absent from the whole group
    sq_dev = torch.where(present, (values - means[group]) ** 2, 0.0)
    sum_sq = zero.index_add(0, group, sq_dev)
    overflowed = (~torch.isfinite(sum_sq) & torch.isfinite(sums)).any(0)  # [K]
    if bool(overflowed.any()) and torch.isfinite(rewards.float()[present]).all():
        # a function's values beyond ~1e19 square past float32's range: its std would be inf and its
        # z silently 0. z does not depend on the scale: those columns times a power of two (exact)
        # that brings them within [-1, 1]
        scales = torch.ones(values.shape[1], dtype=torch.float32, device=values.device)
        for k in overflowed.nonzero().flatten().tolist():
            scales[k] = power_of_two_scale(torch.where(present[:, k], values[:, k], 0.0))
        return normalize_then_sum(values * scales, weights, group_ids, eps)
    stds = (sum_sq / (counts - 1)).sqrt()
    stds = torch.where(counts > 1, stds, torch.full_like(stds, math.nan))
    z = (values - means[group]) / (stds[group] + eps)  # NaN wherever r is NaN or the std is
    total = (torch.where(z.isnan(), 0.0, z) * weights.to(z).unsqueeze(0)).sum(-1)
    return total, z
