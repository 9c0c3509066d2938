"""Policy losses and the value loss."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import agg_loss, masked_mean
from rlhf.algorithms.registry import Registry, variant

POLICY_LOSSES: Registry = Registry("policy loss", inputs=("logprobs", "old_logprobs", "advantages", "mask", "loss_agg_mode",
                                                           "norm_length", "token_weights", "is_weights"))

# TRL's importance_sampling_level: one ratio per token, or one per response (GSPO's length-normalised one).
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------------------------
# Policy losses:  fn(logprobs, old_logprobs, advantages, mask, *, <only what it reads>)
#                    -> (float32 scalar loss, stats dict of floats)
# The trainer offers loss_agg_mode, norm_length (the constant of seq-mean-token-sum-norm), the
# flat settings clip_range, clip_range_high, dual_clip, and policy_loss_kwargs. Keyword
# parameters with defaults are the loss's hyperparameters. Aggregate with ``agg_loss`` so that
# the trainer's global normaliser (agg_units) matches.
# token_weights [B, T] | None (offered when an option needs it: off-policy sequence mask,
# high-entropy token mask, sampler importance weights) multiplies the per-token loss before the
# aggregation, which still divides by the mask's counts, as TRL's _compute_loss does: a masked
# token adds 0 to the sum but still counts in the normaliser. A loss that does not declare it
# cannot be combined with those options (RLConfig refuses them in one line).
# ----------------------------------------------------------------------------------------------


def _check_clip_ranges(name: str, clip_range: float, clip_range_high: float | None) -> None:
    if not clip_range > 0 or (clip_range_high is not None and not clip_range_high > 0):
        raise ValueError(f"{name}: clip_range and clip_range_high must be > 0, got {clip_range}, {clip_range_high}")


def _approx_kl(logprobs: Tensor, old_logprobs: Tensor | None, mask: Tensor) -> float:
    if old_logprobs is None:
        return 0.0
    return float(masked_mean(0.5 * (logprobs.detach().float() - old_logprobs.float()) ** 2, mask))


def _check_level(name: str, level: str) -> None:
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"{name}: importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                         f"got {level!r}")


def log_importance_weights(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log of the importance ratio pi_theta / pi_old, float32, with the gradient of ``logprobs``.

    level "token":    log r_{i,t} = lp_{i,t} - old_{i,t}                          [B, T]
    level "sequence": log s_i = (1/|y_i|) sum_t mask_{i,t} (lp_{i,t} - old_{i,t})  [B, 1]  (GSPO;
                      rows without a real token give 0)
    logprobs, old_logprobs, mask: [B, T]. TRL 1.16 _compute_loss computes the same ``log_importance_weights``.
    """
    log_ratio = logprobs.float() - old_logprobs.float().detach()
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, got {level!r}")
    mask_f = mask.float()
    return ((log_ratio * mask_f).sum(-1) / mask_f.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _weighted(per_token: Tensor, token_weights: Tensor | None) -> Tensor:
    """per_token x token_weights (masks, importance weights); the aggregation's counts stay the mask's."""
    return per_token if token_weights is None else per_token * token_weights.float().detach()


def _masked_share(flags: Tensor, mask: Tensor) -> float:
    """Share of real tokens [B, T] (or of rows, for a [B, 1] sequence-level flag) that are set, as TRL logs it."""
    if flags.shape[-1] == 1 and mask.shape[-1] != 1:
        return float(flags.float().mean())
    return float(masked_mean(flags.float(), mask))


@POLICY_LOSSES.register("pg")
def pg_loss(
    logprobs: Tensor, old_logprobs: Tensor | None, advantages: Tensor, mask: Tensor, *,
    loss_agg_mode: str = "token-mean", norm_length: int | None = None, token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Vanilla policy gradient (REINFORCE): per-token loss = -A_t * log pi(a_t | s_t).

    Its gradient is the policy-gradient theorem's estimator -A_t * grad log pi. old_logprobs is
    only used for the ``approx_kl`` diagnostic. logprobs, old_logprobs, advantages, mask: [B, T].
    Returns (float32 scalar loss, {"clip_frac": 0.0, "approx_kl": ...}).
    """
    per_token = _weighted(-advantages.float().detach() * logprobs.float(), token_weights)
    loss = agg_loss(per_token, mask, loss_agg_mode, norm_length)
    return loss, {"clip_frac": 0.0, "approx_kl": _approx_kl(logprobs, old_logprobs, mask)}


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.2,
    clip_range_high: float | None = None, dual_clip: float | None = None, delta: float | None = None,
    importance_sampling_level: str = "token", loss_agg_mode: str = "token-mean", norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017), with DAPO clip-higher, dual-clip, two-sided clip
    and sequence-level ratios; TRL's loss_type grpo / bnpo / dr_grpo / dapo (they differ only in
    loss_agg_mode).

    r = exp(log_importance_weights(lp, old, level))   [B, T] per token, or [B, 1] per response (GSPO)
    l1 = -A * min(r, delta);  l2 = -A * clamp(r, 1 - clip_range, 1 + (clip_range_high or clip_range))
    per-token loss = max(l1, l2) * token_weights
    delta (INTELLECT-2, TRL's delta; > 1 + clip_range_high) caps the unclipped ratio too, so a
    negative advantage cannot make the loss grow without bound; dual_clip = c > 1 (Ye et al.
    2020): for A < 0, loss = min(max(l1, l2), -A * c), the same idea on the loss.
    logprobs, old_logprobs, advantages, mask, token_weights: [B, T]. Returns (float32 scalar loss,
    stats) with clip_frac = token-mean[l2 > l1], approx_kl = token-mean[0.5 (lp - old)^2],
    dual_clip_frac, and TRL's clip_ratio/low_mean (r < 1 - eps with A < 0), high_mean (r > 1 + eps_high
    with A > 0), region_mean (either).
    """
    _check_clip_ranges("ppo_clip", clip_range, clip_range_high)
    _check_level("ppo_clip", importance_sampling_level)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    upper = clip_range if clip_range_high is None else clip_range_high
    if delta is not None and delta <= 1.0:  # TRL recommends > 1 + epsilon_high; below 1 no update would be on-policy
        raise ValueError(f"delta caps the importance ratio and must be > 1 (INTELLECT-2: 4), got {delta}")
    adv = advantages.float().detach()
    # Clamp the log-ratio before exp: a single token with a huge ratio would otherwise give inf*0.
    ratio = torch.exp(log_importance_weights(logprobs, old_logprobs, mask, importance_sampling_level).clamp(-20.0, 20.0))
    capped = ratio if delta is None else ratio.clamp(max=delta)
    loss_unclipped = -adv * capped
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + upper)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    row_adv = adv[:, :1] if ratio.shape[-1] == 1 else adv  # sequence level: one flag per response, as TRL counts
    low, high = (capped < 1.0 - clip_range) & (row_adv < 0), (capped > 1.0 + upper) & (row_adv > 0)
    stats = {
        "clip_frac": float(masked_mean((loss_clipped > loss_unclipped).float(), mask)),
        "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
        "clip_ratio/low_mean": _masked_share(low, mask),
        "clip_ratio/high_mean": _masked_share(high, mask),
        "clip_ratio/region_mean": _masked_share(low | high, mask),
    }
    if dual_clip is not None:
        capped_loss = torch.minimum(per_token, -adv * dual_clip)
        stats["dual_clip_frac"] = float(masked_mean(((adv < 0) & (capped_loss < per_token)).float(), mask))
        per_token = torch.where(adv < 0, capped_loss, per_token)
    loss = agg_loss(_weighted(per_token, token_weights), mask, loss_agg_mode, norm_length)
    return loss, stats


@POLICY_LOSSES.register("luspo")
def luspo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.2,
    clip_range_high: float | None = None, delta: float | None = None, importance_sampling_level: str = "sequence",
    loss_agg_mode: str = "seq-mean-token-sum", norm_length: int | None = None, token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """LUSPO (Length-Unbiased Sequence Policy Optimization, 2026; TRL loss_type luspo): GSPO's
    clipped sequence-level ratio, each response's loss summed over its tokens instead of averaged.

    s_i = exp(mean_t(lp - old)),  per-sequence loss L_i = max(-A_i min(s_i, delta), -A_i clamp(s_i, 1-eps, 1+eps_high))
    loss = (1/K) sum_i |y_i| L_i   (seq-mean-token-sum: the length weight GSPO's mean removes)
    Only the sequence level is LUSPO (TRL 1.16 warns and computes token ratios otherwise); the
    clip ranges are TRL's (0.2). logprobs, old_logprobs, advantages, mask, token_weights: [B, T] ->
    (float32 scalar, ppo_clip's stats).
    """
    if importance_sampling_level != "sequence":
        raise ValueError("luspo: importance_sampling_level must be 'sequence' (LUSPO is GSPO's sequence-level ratio with "
                         f"a length-weighted sum), got {importance_sampling_level!r}")
    return ppo_clip_loss(logprobs, old_logprobs, advantages, mask, clip_range=clip_range, clip_range_high=clip_range_high,
                         delta=delta, importance_sampling_level="sequence", loss_agg_mode=loss_agg_mode,
                         norm_length=norm_length, token_weights=token_weights)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean", norm_length: int | None = None
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
# 2025 policy losses: sequence-level ratios (GSPO) and clipped importance weights (CISPO)
# ----------------------------------------------------------------------------------------------


def _sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log s_i = (1/|y_i|) sum_t (lp - old) over real tokens, float32 [B, 1] (0 for empty rows)."""
    mask_f = mask.float()
    log_ratio = (logprobs.float() - old_logprobs.float().detach()) * mask_f
    return (log_ratio.sum(-1) / mask_f.sum(-1).clamp(min=1.0)).unsqueeze(-1)


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 3e-4,
    clip_range_high: float | None = None, token_level_gradient: bool = False,
    loss_agg_mode: str = "seq-mean-token-mean", norm_length: int | None = None, token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, Qwen3): one importance ratio per response.

    s_i = exp( (1/|y_i|) sum_t (lp_{i,t} - old_{i,t}) )      (length-normalised sequence ratio)
    per-sequence loss = max(-A_i s_i, -A_i clamp(s_i, 1 - clip_range, 1 + clip_range_high)),
    spread over row i's tokens and aggregated by ``agg_loss`` (seq-mean-token-mean = the paper's
    mean over responses). A_i is row i's per-token advantage (constant over the row for GRPO).
    The ranges are far smaller than PPO's because a sequence ratio moves less (paper: 3e-4, 4e-4);
    clip_range_high=None means 4/3 x clip_range, the paper's proportion. This is TRL's
    importance_sampling_level="sequence" with the paper's ranges (TRL keeps its 0.2 there: TRL's
    names map to ppo_clip at that level). token_level_gradient=True is GSPO-token (not in TRL;
    TRL's "token" level is plain per-token ratios, i.e. ppo_clip): s_{i,t} = sg[s_i] * pi(y_t) /
    sg[pi(y_t)], numerically s_i (the same responses are clipped) but token t's gradient is
    s_i * A_{i,t} * grad log pi(y_t), so per-token advantages steer single tokens.
    logprobs, old_logprobs, advantages, mask: [B, T] -> (float32 scalar, {"clip_frac": share of
    responses clipped, "approx_kl"}).
    """
    _check_clip_ranges("gspo", clip_range, clip_range_high)
    upper = clip_range * 4.0 / 3.0 if clip_range_high is None else clip_range_high
    adv = advantages.float().detach()
    log_seq_ratio = _sequence_log_ratio(logprobs, old_logprobs, mask).clamp(-20.0, 20.0)
    if token_level_gradient:
        log_seq_ratio = log_seq_ratio.detach() + logprobs.float() - logprobs.float().detach()
    ratio = torch.exp(log_seq_ratio).expand_as(adv)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + upper)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped).float() * mask.float()
    sequences = (mask.float().sum(-1) > 0).float()
    stats = {
        # GSPO clips whole responses: the share of sequences whose clipped term won.
        "clip_frac": float((clipped.amax(-1) * sequences).sum() / sequences.sum().clamp(min=1.0)),
        "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
    }
    return agg_loss(_weighted(per_token, token_weights), mask, loss_agg_mode, norm_length), stats


gspo_token_loss = POLICY_LOSSES.register("gspo_token")(variant(
    gspo_loss, "gspo_token_loss", token_level_gradient=True, doc="""GSPO-token (Zheng et al. 2025): GSPO's clipping with a per-token advantage.

    gspo_loss with token_level_gradient=True: s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)],
    numerically s_i, gradient of token t = s_i * A_{i,t} * grad log pi(y_t). With A constant over
    a row it equals GSPO. logprobs, old_logprobs, advantages, mask: [B, T] -> (scalar, stats).
    """))


@POLICY_LOSSES.register("cispo")
def cispo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, epsilon_high: float = 5.0,
    epsilon_low: float | None = None, importance_sampling_level: str = "token", loss_agg_mode: str = "token-mean",
    norm_length: int | None = None, token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, 2025): REINFORCE weighted by a clipped, stop-gradient importance ratio.

    r = exp(log_importance_weights(lp, old, level))   ([B, T] per token, [B, 1] per response)
    w = sg[ clamp(r, 1 - epsilon_low, epsilon_high) ]   (no lower bound when epsilon_low is None,
    as in the paper and TRL);   per-token loss = -w * A * lp * token_weights.
    Unlike PPO no token leaves the gradient: a token with a large ratio still learns, with its
    weight capped. epsilon_high is the cap on the ratio itself, as TRL's loss_type="cispo" uses it
    (ScaleRL's eps_max, 5.0). TRL accepts any cap: one at or below 1 weights every token by about
    the cap (scaled REINFORCE), which is what a TRL config without epsilon_high gets (epsilon, 0.2).
    logprobs, old_logprobs, advantages, mask, token_weights: [B, T] -> (float32 scalar loss,
    {"clip_frac": share of tokens whose weight was capped, "approx_kl", "cispo_clip_ratio": TRL's
    share with r > epsilon_high and A > 0}).
    """
    if not epsilon_high > 0.0:
        raise ValueError(f"cispo: epsilon_high caps the importance ratio and must be > 0 (e.g. 5.0), got {epsilon_high}")
    if epsilon_low is not None and not 0.0 <= epsilon_low <= 1.0:
        raise ValueError(f"cispo: epsilon_low must be in [0, 1] or none, got {epsilon_low}")
    _check_level("cispo", importance_sampling_level)
    log_ratio = log_importance_weights(logprobs, old_logprobs, mask, importance_sampling_level).detach()
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    lower = 0.0 if epsilon_low is None else 1.0 - epsilon_low
    weight = ratio.clamp(min=lower, max=epsilon_high)
    adv = advantages.float().detach()
    per_token = _weighted(-weight * adv * logprobs.float(), token_weights)
    stats = {"clip_frac": _masked_share((weight != ratio).expand_as(adv), mask),
             "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
             "cispo_clip_ratio": _masked_share((ratio > epsilon_high) & ((adv[:, :1] if ratio.shape[-1] == 1 else adv) > 0),
                                               mask)}
    return agg_loss(per_token, mask, loss_agg_mode, norm_length), stats


@POLICY_LOSSES.register("sapo")
def sapo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, temperature_pos: float = 1.0,
    temperature_neg: float = 1.05, importance_sampling_level: str = "token",
    loss_agg_mode: str = "seq-mean-token-mean", norm_length: int | None = None, token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """SAPO (Soft Adaptive Policy Optimization, Qwen 2025; TRL loss_type sapo): a smooth,
    temperature-controlled gate on the ratio instead of a hard clip.

    r = exp(log_importance_weights(lp, old, level));   tau = temperature_pos if A > 0 else temperature_neg
    gate = sigmoid(tau (r - 1)) * 4 / tau;   per-token loss = -gate * A * token_weights
    At r = 1 the gate's slope is 1 (the policy gradient); far from 1 it flattens, so off-policy
    tokens fade out instead of being cut. A larger temperature_neg damps negative-advantage tokens
    sooner (TRL and the paper: 1.0 / 1.05). Default aggregation is GRPO's (TRL aggregates sapo like grpo).
    logprobs, old_logprobs, advantages, mask, token_weights: [B, T] -> (float32 scalar loss,
    {"clip_frac": 0.0 (nothing is clipped), "approx_kl", "sapo/gate_mean": mean gate value}).
    """
    if not (temperature_pos > 0 and temperature_neg > 0):
        raise ValueError(f"sapo: temperature_pos and temperature_neg must be > 0, got {temperature_pos}, {temperature_neg}")
    _check_level("sapo", importance_sampling_level)
    adv = advantages.float().detach()
    ratio = torch.exp(log_importance_weights(logprobs, old_logprobs, mask, importance_sampling_level).clamp(-20.0, 20.0))
    tau = torch.where(adv > 0, temperature_pos, temperature_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    per_token = _weighted(-gate * adv, token_weights)
    stats = {"clip_frac": 0.0, "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
             "sapo/gate_mean": _masked_share(gate.detach(), mask)}
    return agg_loss(per_token, mask, loss_agg_mode, norm_length), stats


@torch.no_grad()
def gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, is_weights: Tensor | None = None, *,
                  k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0) -> Tensor:
    """VESPO's sequence weight phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1), no gradient.

    log w_i = clamp( sum_t mask (clamp(lp - old, -20, 20)) + sum_t mask log is_t , log 1e-8, 20 )
    (the product of token ratios, not GSPO's mean; is_weights corrects for the sampler);
    k, lambda = (k_pos, lambda_pos) where A >= 0 else (k_neg, lambda_neg);
    log phi = lambda + k log w - lambda w;   NaN/inf -> 0 (as TRL's get_gamma_weights).
    advantages, log_ratio, mask, is_weights: [B, T] -> phi [B, T] (constant over a row where A is).
    """
    floor = math.log(1e-8)
    mask_f = mask.float()
    log_w = (log_ratio.float().clamp(-20.0, 20.0) * mask_f).sum(-1, keepdim=True)
    if is_weights is not None:
        log_w = log_w + (torch.log(is_weights.float()).clamp(floor, 20.0) * mask_f).sum(-1, keepdim=True)
    log_w = log_w.clamp(floor, 20.0)
    nonneg = advantages.float() >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@POLICY_LOSSES.register("vespo")
def vespo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, k_pos: float = 2.0,
    lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0, loss_agg_mode: str = "token-mean",
    norm_length: int | None = None, token_weights: Tensor | None = None, is_weights: Tensor | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, dict[str, float]]:
    """VESPO (Variational Sequence-Level Soft Policy Optimization, 2026; TRL loss_type vespo):
    REINFORCE weighted by a smooth, asymmetric function of the sequence importance ratio.

    phi_i = gamma_weights(A, lp - old, mask, is_weights; k, lambda by the sign of A)   (no gradient)
    per-token loss = -phi_i * A * lp * token_weights   (token-mean, like TRL's dapo normaliser)
    The sampler's importance weights enter phi (is_weights, token-level [B, T]) instead of
    multiplying the loss. TRL defaults: k_pos 2, lambda_pos 3, k_neg 3, lambda_neg 2.
    logprobs, old_logprobs, advantages, mask, token_weights, is_weights: [B, T] -> (float32 scalar,
    {"clip_frac": 0.0, "approx_kl", "vespo/phi_seq_mean": mean phi over responses}).
    importance_sampling_level is accepted as "token" only: phi is a function of the sequence ratio
    already (TRL warns and computes the same).
    """
    if importance_sampling_level != "token":
        raise ValueError("vespo computes its sequence weight itself: importance_sampling_level must be 'token', "
                         f"got {importance_sampling_level!r}")
    if min(k_pos, k_neg) < 0 or min(lambda_pos, lambda_neg) <= 0:
        raise ValueError(f"vespo: k_pos/k_neg must be >= 0 and lambda_pos/lambda_neg > 0, got k {k_pos}, {k_neg}, "
                         f"lambda {lambda_pos}, {lambda_neg}")
    adv = advantages.float().detach()
    phi = gamma_weights(adv, logprobs.detach().float() - old_logprobs.float(), mask, is_weights,
                        k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg)
    per_token = _weighted(-phi * adv * logprobs.float(), token_weights)
    rows = (mask.float().sum(-1) > 0).float()
    phi_rows = phi[:, 0]  # one value per response where A is constant over it (group advantages)
    stats = {"clip_frac": 0.0, "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
             "vespo/phi_seq_mean": float((phi_rows * rows).sum() / rows.sum().clamp(min=1.0))}
    return agg_loss(per_token, mask, loss_agg_mode, norm_length), stats


# ----------------------------------------------------------------------------------------------
# Token selection and entropy regularisation (TRL's top_entropy_quantile, off_policy_mask_threshold,
# entropy_coef / use_adaptive_entropy): weights and a controller the update combines with any loss
# ----------------------------------------------------------------------------------------------


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float,
                      gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Keep only the top-``quantile`` share of real tokens by entropy (Wang et al. 2025, "Beyond the
    80/20 rule": the forking tokens carry the learning signal), bool [B, T].

    threshold = torch.quantile(H over every real token, 1 - quantile)  (linear interpolation; over
    every process when ``gather`` concatenates their 1-D tensors);  keep = H >= threshold and mask.
    quantile 1 keeps every token, 0 only the highest. entropy, mask: [B, T].
    """
    local = entropy.detach().float()[mask.bool()]
    values = gather(local) if gather is not None else local
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy.detach().float() * mask.float() >= threshold) & mask.bool()


def off_policy_mask(advantages: Tensor, logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2, eq. 9; TRL's off_policy_mask_threshold), float [B, T].

    kl_i = (1/|y_i|) sum_t mask (sampler_lp - lp)   (how far the sampling policy has drifted; NaN
    tokens count 0);   keep token t of row i = A_{i,t} >= 0 or kl_i <= threshold.
    Responses with a negative advantage that the current policy has moved away from teach what
    is no longer sampled, so they leave the loss. advantages, logprobs, sampler_logprobs, mask: [B, T].
    """
    mask_f = mask.float()
    drift = torch.nan_to_num(sampler_logprobs.float() - logprobs.detach().float(), nan=0.0)
    mean_drift = (drift * mask_f).sum(-1, keepdim=True) / mask_f.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_drift <= threshold)).float()


class AdaptiveEntropyController:
    """The entropy bonus coefficient (TRL's entropy_coef; adaptive: Skywork-OR1, He et al. 2025).

    Static: ``applied()`` is always entropy_coef. Adaptive: after each optimizer step,
    ``update(H)`` with the step's mean entropy H moves the coefficient by entropy_coef_delta
    (up when H <= entropy_target, down otherwise) inside [entropy_coef_min, entropy_coef_max],
    and the next step applies it only while the last H was <= entropy_target (no bonus before
    the first measurement). ``state_dict`` holds what a resume needs.
    """

    def __init__(self, coef: float, adaptive: bool = False, target: float = 0.2, coef_min: float = 0.0,
                 coef_max: float = 1.0, coef_delta: float = 0.005):
        self.value, self.adaptive, self.target = float(coef), adaptive, target
        self.coef_min, self.coef_max, self.coef_delta = coef_min, coef_max, coef_delta
        self.last_entropy = math.inf

    @property
    def enabled(self) -> bool:
        return self.value != 0.0 or self.adaptive

    def applied(self) -> float:
        if not self.adaptive:
            return self.value
        return self.value if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> None:
        if not self.adaptive:
            return
        step = self.coef_delta if entropy <= self.target else -self.coef_delta
        self.value = min(max(self.value + step, self.coef_min), self.coef_max)
        self.last_entropy = float(entropy)

    def state_dict(self) -> dict[str, float | None]:
        # JSON has no infinity: None = not measured yet
        return {"value": self.value, "last_entropy": None if math.isinf(self.last_entropy) else self.last_entropy}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        # a resume may narrow [coef_min, coef_max]: the new bounds hold from the first step
        self.value = min(max(float(state["value"]), self.coef_min), self.coef_max) if self.adaptive else float(state["value"])
        last = state.get("last_entropy")
        self.last_entropy = math.inf if last is None else float(last)
