"""Policy-gradient math for RL fine-tuning of language models, as pure tensor functions.

Nothing here knows about models, tokenizers or Accelerate: every function maps tensors to
tensors, so the trainer, the tests and user code can call them alike.

Vocabulary and shapes (used in every docstring):
    B             number of sequences (responses) in the batch
    T             number of response tokens (padded)
    mask          [B, T] float/bool, 1 = real response token, 0 = padding after EOS
    token_rewards [B, T] per-token rewards (score at the last real token, minus KL penalty)
    logprobs      [B, T] log pi_theta(a_t | s_t) of the sampled tokens
    old_logprobs  [B, T] the same under the policy that generated the rollout
    ref_logprobs  [B, T] the same under the frozen reference policy
    values        [B, T] critic estimates V(s_t)
    advantages    [B, T], returns [B, T]
    group_ids     [B] integer id of the prompt group each sequence belongs to

Inputs may be float32 or bfloat16; anything that reduces or accumulates runs and returns in
float32 so that low-precision activations never decide the loss math. No function changes its
inputs in place.

Registries: ``ADVANTAGE_ESTIMATORS`` and ``POLICY_LOSSES`` map config names to functions that
share one signature each; an unknown name raises ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "whiten_with_stats",
    "agg_loss",
    "agg_units",
    "declared_kwargs",
    "LOSS_AGG_MODES",
    "kl_penalty",
    "KL_ESTIMATORS",
    "token_level_rewards",
    "FixedKLController",
    "AdaptiveKLController",
    "MovingAverageBaseline",
    "discounted_returns",
    "sequence_scores",
    "group_stats",
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "Registry",
    "value_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "logprobs_and_entropy_from_logits",
    "conjugate_gradient",
    "trpo_step_size",
    "backtracking_line_search",
]


class Registry(dict):
    """A name -> function dict whose missing keys raise ``ValueError`` naming the valid keys."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def __missing__(self, name: str):
        raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self))}")

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            self[name] = fn
            return fn

        return decorator


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
POLICY_LOSSES: Registry = Registry("policy loss")


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is set, in float32.

    x, mask: same shape (e.g. [B, T]); dim=None reduces everything to a scalar.
    """
    masked = x.float() * mask.float()
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over masked positions: sum(x * mask) / sum(mask), in float32.

    x, mask: same shape (e.g. [B, T]). dim=None -> scalar; dim=d reduces only dimension d
    (rows with an empty mask give 0 rather than NaN).
    """
    mask = mask.float()
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (all dimensions pooled), float32 scalar.

    x, mask: same shape (e.g. [B, T]).
    var = sum(mask * (x - mean)^2) / (n - 1)   with n = sum(mask)   (unbiased, Bessel)
    var = sum(mask * (x - mean)^2) / n                               (unbiased=False)
    """
    mask = mask.float()
    mean = masked_mean(x, mask)
    centered_sq = (x.float() - mean) ** 2
    n = mask.sum()
    sum_sq = masked_sum(centered_sq, mask)
    if unbiased:
        if n <= 1:
            return torch.zeros((), dtype=torch.float32, device=x.device)
        return sum_sq / (n - 1)
    return sum_sq / n.clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalise masked entries of ``x`` to zero mean and unit variance, float32, same shape.

    x, mask: same shape (e.g. [B, T]).
    out = (x - mean) / sqrt(var + eps)      mean, var (unbiased) over entries with mask = 1
    shift_mean=False adds the mean back:  out = (x - mean) / sqrt(var + eps) + mean
    Masked-out positions are set to 0 so padding can never leak into a loss.
    all_reduce (sums a tensor over processes) makes mean and var those of the global batch: a
    per-process whitening gives different advantages on 2 processes than on 1 (RL_NOTES 10).
    """
    mask_f = mask.float()
    if all_reduce is None:
        return whiten_with_stats(x, mask_f, masked_mean(x, mask_f), masked_var(x, mask_f), shift_mean, eps)
    # Two reductions (mean, then squared deviations from it): the one-pass E[x^2] - E[x]^2 loses
    # the variance in float32 when the mean is large against the spread.
    total, count = all_reduce(torch.stack([masked_sum(x, mask_f), mask_f.sum()])).tolist()
    mean = total / max(count, 1.0)
    sum_sq = float(all_reduce(masked_sum((x.float() - mean) ** 2, mask_f).reshape(1)))
    var = sum_sq / max(count - 1.0, 1.0)
    return whiten_with_stats(x, mask_f, mean, var, shift_mean, eps)


def whiten_with_stats(x: Tensor, mask: Tensor, mean: Tensor | float, var: Tensor | float,
                      shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """masked_whiten with given statistics, e.g. mean and variance reduced over all processes.

    x, mask: same shape. out = (x - mean) / sqrt(var + eps) (+ mean if not shift_mean), 0 on padding.
    """
    var = torch.as_tensor(var, dtype=torch.float32, device=x.device)
    whitened = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.float()


# ----------------------------------------------------------------------------------------------
# Loss aggregation
# ----------------------------------------------------------------------------------------------

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def agg_units(mask: Tensor, mode: str = "token-mean") -> Tensor:
    """What ``agg_loss`` averages over, float32 scalar: real tokens for token-mean, rows with at
    least one real token for the seq-* modes.

    mask: [B, T]. Rows whose mask is all 0 (groups dropped by filter_zero_std_groups) are no
    sequences of the batch, so no mode counts them. Summed over micro-batches and processes this
    is the global normaliser: micro-batch loss * its units / global units adds up to the loss of
    the whole batch (RL_NOTES 14).
    """
    mask = mask.float()
    if mode == "token-mean":
        return mask.sum()
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}")
    return (mask.sum(-1) > 0).float().sum()


def agg_loss(loss: Tensor, mask: Tensor, mode: str = "token-mean", norm_length: int | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a float32 scalar.

    loss, mask: [B, T]; K = rows with at least one real token (``agg_units``).
    token-mean               = sum(loss * mask) / sum(mask)              (DAPO; no length bias)
    seq-mean-token-mean      = (1/K) sum_i ( sum_t(loss * mask)_i / sum_t(mask)_i )   (original GRPO)
    seq-mean-token-sum       = (1/K) sum_i ( sum_t(loss * mask)_i )
    seq-mean-token-sum-norm  = sum(loss * mask) / (K * norm_length)
                             (Dr. GRPO: norm_length is a constant such as max_new_tokens; the
                             padded width T would change with every batch and every process)
    """
    mask = mask.float()
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}")
    rows = agg_units(mask, mode).clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        return (masked_sum(loss, mask, dim=-1) / mask.sum(-1).clamp(min=1.0)).sum() / rows
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask) / rows
    if norm_length is None:
        raise ValueError("loss_agg_mode 'seq-mean-token-sum-norm' needs norm_length, a constant divisor "
                         "such as max_new_tokens")
    return masked_sum(loss, mask) / (rows * norm_length)


def declared_kwargs(fn: Callable, available: dict[str, object]) -> dict[str, object]:
    """The entries of ``available`` that ``fn`` names as parameters (all of them if it takes **kwargs).

    Lets the trainer offer every input it has (e.g. ``all_reduce``, ``norm_length``) while a
    registered function, ours or a user's, declares only the ones it reads.
    """
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(available)
    return {name: value for name, value in available.items() if name in parameters}


# ----------------------------------------------------------------------------------------------
# KL penalty and reward shaping
# ----------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1", mask: Tensor | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token logprobs, float32 [B, T].

    With log_ratio = lp - ref (Schulman, "Approximating KL divergence", 2020):
        k1 = lp - ref                                 unbiased, can be negative per token
        k2 = 0.5 * (lp - ref)^2                       biased, low variance, >= 0
        k3 = exp(ref - lp) - (ref - lp) - 1           unbiased, >= 0 (GRPO's loss term)
    Positions where ``mask`` is 0 are 0 (mask defaults to all ones). The log-ratio inside the
    k3 exponential is clamped to [-20, 20] so one outlier token cannot overflow to inf.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.square()
    elif estimator == "k3":
        neg = (-log_ratio).clamp(-20.0, 20.0)
        kl = torch.exp(neg) - neg - 1.0
    else:
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid names: {', '.join(KL_ESTIMATORS)}")
    if mask is not None:
        kl = kl * mask.float()
    return kl


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


class FixedKLController:
    """A constant KL coefficient: ``value`` never changes."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    err   = clip(current_kl / target - 1, -0.2, 0.2)
    value = value * (1 + err * n_steps / horizon)
    The coefficient grows while the policy drifts past ``target`` nats and shrinks below it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


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
# Advantage estimators:  fn(token_rewards, mask, *, values, group_ids, gamma, lam, baseline, eps)
#                        -> (advantages [B, T], returns [B, T])
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


def _require_group_ids(group_ids: Tensor | None, name: str) -> Tensor:
    if group_ids is None:
        raise ValueError(f"advantage estimator {name!r} needs group_ids [B] (num_generations samples per prompt)")
    return group_ids


@ADVANTAGE_ESTIMATORS.register("reinforce")
def reinforce_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    baseline: float = 0.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE with a baseline (Williams 1992): A_t = G_t - b.

    G_t = sum_{l >= t} gamma^(l - t) r_l over real tokens; b = ``baseline``, the moving average
    of earlier batches' returns (value *before* this batch updates it).
    token_rewards, mask: [B, T] -> advantages [B, T], returns G [B, T] (float32, 0 on padding).
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    advantages = (returns - float(baseline)) * mask.float()
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register("gae")
def gae_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    baseline: float = 0.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) on response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t         with V = 0 after the last real token
    A_t     = sum_{l >= 0} (gamma * lam)^l delta_{t+l}
    returns = A + V                               (the critic's regression target)
    token_rewards, values, mask: [B, T] -> advantages [B, T], returns [B, T] (float32).
    """
    if values is None:
        raise ValueError("advantage estimator 'gae' needs values [B, T] from a value head")
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


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    baseline: float = 0.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath).

    s_i = sum_t r_{i,t};  A_i = (s_i - mean_{j in g(i)} s_j) / (std_{j in g(i)} s_j + eps)
    std unbiased; a group of one sample gets A = 0. A_i is broadcast over row i's real tokens.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """
    group_ids = _require_group_ids(group_ids, "grpo")
    scores = sequence_scores(token_rewards, mask)
    group_sum, group_count, group_std = group_stats(scores, group_ids)
    seq_adv = (scores - group_sum / group_count) / (group_std + eps)
    advantages = seq_adv.unsqueeze(1) * mask.float()
    return advantages, advantages.clone()


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    baseline: float = 0.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (Liu et al. 2025): group-mean baseline without the std division.

    A_i = s_i - mean_{j in g(i)} s_j, broadcast over real tokens. Dividing by the std favours
    questions that are too easy or too hard; dropping it removes that difficulty bias.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """
    group_ids = _require_group_ids(group_ids, "dr_grpo")
    scores = sequence_scores(token_rewards, mask)
    group_sum, group_count, _ = group_stats(scores, group_ids)
    advantages = (scores - group_sum / group_count).unsqueeze(1) * mask.float()
    return advantages, advantages.clone()


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    baseline: float = 0.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024).

    The whole response is one action: A_i = s_i - (sum_{j in g(i), j != i} s_j) / (k - 1),
    k = size of i's group; a group of one sample has no baseline and gets A = 0.
    token_rewards, mask: [B, T]; group_ids: [B] -> advantages [B, T], returns = advantages.
    """
    group_ids = _require_group_ids(group_ids, "rloo")
    scores = sequence_scores(token_rewards, mask)
    group_sum, group_count, _ = group_stats(scores, group_ids)
    leave_one_out = (group_sum - scores) / (group_count - 1).clamp(min=1.0)
    seq_adv = torch.where(group_count > 1, scores - leave_one_out, torch.zeros_like(scores))
    advantages = seq_adv.unsqueeze(1) * mask.float()
    return advantages, advantages.clone()


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    group_ids: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    baseline: float = 0.0,
    eps: float = 1e-6,
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
    advantages = masked_whiten(returns, mask, all_reduce=all_reduce)
    return advantages, returns


# ----------------------------------------------------------------------------------------------
# Policy losses:  fn(logprobs, old_logprobs, advantages, mask, *, clip_range, clip_range_high,
#                    dual_clip, loss_agg_mode, norm_length) -> (loss scalar, stats dict)
# ----------------------------------------------------------------------------------------------


def _approx_kl(logprobs: Tensor, old_logprobs: Tensor | None, mask: Tensor) -> float:
    if old_logprobs is None:
        return 0.0
    return float(masked_mean(0.5 * (logprobs.detach().float() - old_logprobs.float()) ** 2, mask))


@POLICY_LOSSES.register("pg")
def pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Vanilla policy gradient (REINFORCE): per-token loss = -A_t * log pi(a_t | s_t).

    Its gradient is the policy-gradient theorem's estimator -A_t * grad log pi. old_logprobs is
    only used for the ``approx_kl`` diagnostic. logprobs, old_logprobs, advantages, mask: [B, T].
    Returns (float32 scalar loss, {"clip_frac": 0.0, "approx_kl": ...}).
    """
    per_token = -advantages.float().detach() * logprobs.float()
    loss = agg_loss(per_token, mask, loss_agg_mode, norm_length)
    return loss, {"clip_frac": 0.0, "approx_kl": _approx_kl(logprobs, old_logprobs, mask)}


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017), with DAPO clip-higher and dual-clip.

    ratio = exp(lp - old)
    l1 = -A * ratio;  l2 = -A * clamp(ratio, 1 - clip_range, 1 + (clip_range_high or clip_range))
    per-token loss = max(l1, l2)
    dual_clip = c > 1 (Ye et al. 2020): for A < 0, loss = min(max(l1, l2), -A * c), which caps
    the loss when a very unlikely token got a negative advantage.
    logprobs, old_logprobs, advantages, mask: [B, T]. Returns (float32 scalar loss, stats) with
    clip_frac = token-mean[l2 > l1], approx_kl = token-mean[0.5 (lp - old)^2], dual_clip_frac.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    upper = clip_range if clip_range_high is None else clip_range_high
    adv = advantages.float().detach()
    # Clamp the log-ratio before exp: a single token with a huge ratio would otherwise give inf*0.
    log_ratio = (logprobs.float() - old_logprobs.float().detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + upper)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    stats = {
        "clip_frac": float(masked_mean((loss_clipped > loss_unclipped).float(), mask)),
        "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
    }
    if dual_clip is not None:
        capped = torch.minimum(per_token, -adv * dual_clip)
        stats["dual_clip_frac"] = float(masked_mean(((adv < 0) & (capped < per_token)).float(), mask))
        per_token = torch.where(adv < 0, capped, per_token)
    loss = agg_loss(per_token, mask, loss_agg_mode, norm_length)
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value-function loss of PPO (aggregated like the policy loss, ``agg_loss``).

    v_clip = old + clamp(v - old, -c, c)
    per-token loss = 0.5 * max((v - R)^2, (v_clip - R)^2);   clip_range=None -> 0.5 * (v - R)^2
    values, old_values, returns, mask: [B, T]. Returns (float32 scalar, {"vf_clip_frac": ...}),
    vf_clip_frac = token-mean of tokens where the clipped term is the larger one.
    """
    v = values.float()
    target = returns.float().detach()
    loss_unclipped = (v - target) ** 2
    if clip_range is None:
        per_token = 0.5 * loss_unclipped
        clip_frac = 0.0
    else:
        old = old_values.float().detach()
        v_clipped = old + torch.clamp(v - old, -clip_range, clip_range)
        loss_clipped = (v_clipped - target) ** 2
        per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
        clip_frac = float(masked_mean((loss_clipped > loss_unclipped).float(), mask))
    return agg_loss(per_token, mask, loss_agg_mode, norm_length), {"vf_clip_frac": clip_frac}


# ----------------------------------------------------------------------------------------------
# Logits helpers
# ----------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position, float32 [B, T].

    logits: [B, T, V].  H = -sum_v p_v log p_v with log p = log_softmax(z), which is stable for
    large logits (log_softmax subtracts the max inside its fused kernel).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels] per position, float32 [B, T].

    logits: [B, T, V]; labels: [B, T] long.  lp = log_softmax(z)[label].
    One fused log_softmax (its backward is softmax minus one-hot, also fused) is about 1.6x faster
    on a CPU than z[label] - logsumexp(z) with its separate reductions. Lower-precision logits are
    upcast one row at a time so the float32 copy stays one row's size.
    """
    labels = labels.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        return torch.log_softmax(logits, dim=-1).gather(-1, labels).squeeze(-1).float()
    rows = [torch.log_softmax(row.float(), dim=-1).gather(-1, row_labels).squeeze(-1)
            for row, row_labels in zip(logits, labels)]
    return torch.stack(rows)


def logprobs_and_entropy_from_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(logprobs_from_logits, entropy_from_logits) from one log_softmax, float32 [B, T] each.

    logits: [B, T, V]; labels: [B, T].  log p = log_softmax(z); lp = log p[label];
    H = -sum_v exp(log p_v) log p_v.  The entropy is a metric and carries no gradient.
    """
    if logits.dtype not in (torch.float32, torch.float64):  # upcast one row at a time, one log_softmax each
        rows = [logprobs_and_entropy_from_logits(row.float().unsqueeze(0), row_labels.unsqueeze(0))
                for row, row_labels in zip(logits, labels)]
        return torch.cat([lp for lp, _ in rows]), torch.cat([h for _, h in rows])
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).float()
    with torch.no_grad():  # row by row: the temporaries stay one row's size instead of two more [B, T, V]
        entropy = torch.stack([-(row.exp() * row).sum(-1) for row in log_probs.detach()]).float()
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------
# TRPO (Schulman et al. 2015): natural-gradient step inside a KL trust region
# ----------------------------------------------------------------------------------------------


def conjugate_gradient(
    Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> Tensor:
    """Solve A x = b for symmetric positive-definite A, given only x -> A x.

    b: [N] flat vector; Avp: [N] -> [N] (e.g. a Fisher-vector product). Returns x [N] float32.
    Standard CG (Hestenes & Stiefel 1952); stops after ``iters`` or when r.r < residual_tol.
    """
    b = b.float()
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual.dot(residual)
    for _ in range(iters):
        if residual_sq < residual_tol:
            break
        A_direction = Avp(direction).float()
        alpha = residual_sq / direction.dot(A_direction)
        x = x + alpha * direction
        residual = residual - alpha * A_direction
        new_residual_sq = residual.dot(residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


def trpo_step_size(step_dir: Tensor, Avp_of_step_dir: Tensor, max_kl: float) -> float:
    """Scale beta so that the quadratic KL model of beta * s equals max_kl.

    0.5 * beta^2 * s^T A s = max_kl  =>  beta = sqrt(2 * max_kl / (s^T A s))
    step_dir, Avp_of_step_dir: [N]. Returns 0.0 when s^T A s <= 0 (no trustworthy curvature).
    """
    curvature = float(step_dir.float().dot(Avp_of_step_dir.float()))
    if not math.isfinite(curvature) or curvature <= 0.0:
        return 0.0
    return math.sqrt(2.0 * max_kl / curvature)


def backtracking_line_search(
    f: Callable[[Tensor], float],
    x0: Tensor,
    full_step: Tensor,
    expected_improve: float,
    max_backtracks: int = 10,
    accept_ratio: float = 0.1,
    constraint: Callable[[Tensor], bool] | None = None,
) -> tuple[bool, Tensor]:
    """Shrink a step until it really improves the objective (TRPO's line search).

    f: x -> loss to *minimise*; x0, full_step: [N]; expected_improve: the first-order predicted
    decrease of f for the full step (-g . full_step). Tries x = x0 + 0.5^k * full_step for
    k = 0 .. max_backtracks-1 and accepts the first one with
        actual = f(x0) - f(x) > 0   and   actual / (0.5^k * expected_improve) > accept_ratio
    and, when given, ``constraint(x)`` true (e.g. measured KL <= max_kl).
    Returns (True, x) for the accepted step, or (False, x0) when none qualifies.
    """
    f0 = float(f(x0))
    for k in range(max_backtracks):
        fraction = 0.5**k
        candidate = x0 + fraction * full_step
        actual_improve = f0 - float(f(candidate))
        expected = expected_improve * fraction
        if (
            actual_improve > 0
            and expected > 0
            and actual_improve / expected > accept_ratio
            and (constraint is None or constraint(candidate))
        ):
            return True, candidate
    return False, x0
