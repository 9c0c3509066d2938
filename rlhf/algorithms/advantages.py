"""Advantage estimators, reward shaping into per-token rewards, and the REINFORCE baseline."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import masked_sum, masked_whiten
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


@ADVANTAGE_ESTIMATORS.register("grpo", groups=True)
def grpo_advantages(
    token_rewards: Tensor, mask: Tensor, *, group_ids: Tensor, eps: float = 1e-6, scale_rewards: bool = True
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath).

    s_i = sum_t r_{i,t};  A_i = (s_i - mean_{j in g(i)} s_j) / (std_{j in g(i)} s_j + eps)
    std unbiased; a group of one sample gets A = 0. A_i is broadcast over row i's real tokens.
    scale_rewards=False (TRL's name) drops the std division: Dr. GRPO.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """
    if scale_rewards and not eps > 0:  # a group of equal rewards would give 0 / 0
        raise ValueError(f"grpo: eps must be > 0 when dividing by the group std, got {eps}")
    scores = sequence_scores(token_rewards, mask)
    group_sum, group_count, group_std = group_stats(scores, group_ids)
    seq_adv = scores - group_sum / group_count
    if scale_rewards:
        seq_adv = seq_adv / (group_std + eps)
    advantages = seq_adv.unsqueeze(1) * mask.float()
    return advantages, advantages.clone()


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
