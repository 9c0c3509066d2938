"""Policy losses that verl ships and TRL does not: GMPO, Clip-Cov, KL-Cov and DPPO.

Same contract as ``losses.py``: fn(logprobs, old_logprobs, advantages, mask, *, <hyperparameters>,
loss_agg_mode, norm_length, token_weights) -> (float32 scalar loss, stats dict of floats), every
tensor [B, T], aggregated by ``agg_loss`` so that the trainer's global normaliser matches.
``token_weights`` [B, T] | None (the update's off-policy / high-entropy masks and sampler
importance weights) multiplies the per-token loss before the aggregation, as in ``losses.py``.
Each equals verl's function (verl/trainer/ppo/core_algos.py, 0.9) on the same tensors where
the two are defined alike; the docstrings name where they differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import agg_loss, masked_mean
from rlhf.algorithms.losses import POLICY_LOSSES, _approx_kl, _check_clip_ranges

# DPPO's approximations of the divergence between the sampling policy and the current one.
DPPO_DIVERGENCES = {"tv": 0.15, "binary_kl": 0.05}  # name -> the paper's threshold (verl's example)


def _weighted(per_token: Tensor, token_weights: Tensor | None) -> Tensor:
    return per_token if token_weights is None else per_token * token_weights.float().detach()


def _check_fraction(name: str, setting: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}: {setting} is the share of tokens selected and must be in (0, 1] "
                         f"(paper: 2e-4 .. 2e-3), got {value}")


# ----------------------------------------------------------------------------------------------
# GMPO: geometric mean of the clipped token ratios
# ----------------------------------------------------------------------------------------------


@POLICY_LOSSES.register("gmpo")
def gmpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.4,
    clip_range_high: float | None = None, loss_agg_mode: str = "seq-mean-token-mean", norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv:2507.20673; verl's "geo_mean").

    GRPO maximises the arithmetic mean of the token terms r_t A; GMPO the geometric mean, which
    one outlier ratio moves far less. Clipping is per token, in log space and wider than PPO's:
    x_t = lp_t - old_t;   c_t = clamp(x_t, -clip_range, clip_range_high)   (e^{+-0.4} by default)
    m_t = sign(A_t) * min(sign(A_t) x_t, sign(A_t) c_t)     (PPO's pessimistic side, in log space)
    s_i = exp( (1/|y_i|) sum_t m_t );   A_i = (1/|y_i|) sum_t A_t;   per-sequence loss = -A_i s_i,
    spread over row i's tokens and aggregated by ``agg_loss`` (seq-mean-token-mean, the default,
    is the paper's mean over responses; verl takes the mean over rows whatever loss_agg_mode).
    A clipped token gets no gradient; the others get -A_i s_i / |y_i| each.
    logprobs, old_logprobs, advantages, mask, token_weights: [B, T] -> (float32 scalar, {"clip_frac":
    share of real tokens whose bound was active, "approx_kl"}). verl's pg_clipfrac counts the tokens
    outside the band with A > 0 whether or not the bound was active.
    """
    _check_clip_ranges("gmpo", clip_range, clip_range_high)
    upper = clip_range if clip_range_high is None else clip_range_high
    mask_f = mask.float()
    log_ratio = logprobs.float() - old_logprobs.float().detach()
    sign = torch.sign(advantages.float().detach())
    clipped = log_ratio.clamp(-clip_range, upper)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)  # 0 where A = 0: no signal
    lengths = mask_f.sum(-1, keepdim=True).clamp(min=1.0)
    # The clamp only guards exp against overflow; the band keeps the mean far inside it.
    seq_ratio = torch.exp(((pessimistic * mask_f).sum(-1, keepdim=True) / lengths).clamp(-20.0, 20.0))  # [B, 1]
    seq_adv = (advantages.float().detach() * mask_f).sum(-1, keepdim=True) / lengths  # [B, 1]
    per_token = (-seq_adv * seq_ratio).expand_as(mask_f)
    bound_active = (pessimistic != log_ratio) & (sign != 0)
    stats = {"clip_frac": float(masked_mean(bound_active.float(), mask_f)),
             "approx_kl": _approx_kl(logprobs, old_logprobs, mask)}
    return agg_loss(_weighted(per_token, token_weights), mask, loss_agg_mode, norm_length), stats


# ----------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov: restrain the few tokens whose (logprob, advantage) covariance is largest
# ----------------------------------------------------------------------------------------------
# Cui et al. 2025 ("The Entropy Mechanism of RL for Reasoning LMs", arXiv:2505.22617): entropy
# falls by Cov(log pi(y), A) under policy gradient, and a tiny share of tokens carries most of
# that covariance. Both losses centre lp and A over the real tokens of the batch they are given
# and pick tokens by (A - mean A)(lp - mean lp). The trainer calls a loss once per micro-batch on
# each process, so the selection (and the "at least one token" floor) is per micro-batch, as in
# verl and the authors' code: a global selection would need the current logprobs of the whole
# minibatch, i.e. another forward pass, before the first backward. So these two are the shipped
# losses whose update depends on how a minibatch is split over processes and micro-batches.


def _centred_covariance(logprobs: Tensor, advantages: Tensor, valid: Tensor) -> Tensor:
    """(A - mean A)(lp - mean lp) over the real tokens, as a 1-D float32 tensor in row-major order."""
    adv = advantages.detach().float()[valid]
    lp = logprobs.detach().float()[valid]
    return (adv - adv.mean()) * (lp - lp.mean())


@POLICY_LOSSES.register("clip_cov")
def clip_cov_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.2,
    clip_range_high: float | None = None, clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0, loss_agg_mode: str = "token-mean", norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clip-Cov (Cui et al. 2025): PPO-clip, with a few random high-covariance tokens left out of
    the gradient.

    l_t = max(-A r_t, -A clamp(r_t, 1 - clip_range, 1 + clip_range_high)),   r_t = exp(lp - old)
    cov_t = (A_t - mean A)(lp_t - mean lp)        (means over the real tokens of this call)
    candidates = real tokens PPO did not clip with clip_cov_lb < cov_t < clip_cov_ub
    n = max(1, floor(clip_cov_ratio * real tokens)) candidates drawn at random (torch's global
    generator, as verl) get loss 0: no gradient, still counted by the aggregation.
    Defaults are the paper's and verl's (2e-4, 1, 5). logprobs, old_logprobs, advantages, mask,
    token_weights: [B, T] -> (float32 scalar, {"clip_frac": share of real tokens PPO clipped,
    "approx_kl", "clip_cov/selected_frac": share detached by covariance (verl's pg_clipfrac)}).
    """
    _check_clip_ranges("clip_cov", clip_range, clip_range_high)
    _check_fraction("clip_cov", "clip_cov_ratio", clip_cov_ratio)
    if not clip_cov_lb < clip_cov_ub:
        raise ValueError(f"clip_cov: clip_cov_lb must be below clip_cov_ub (paper: 1 and 5), "
                         f"got {clip_cov_lb}, {clip_cov_ub}")
    upper = clip_range if clip_range_high is None else clip_range_high
    adv = advantages.float().detach()
    ratio = torch.exp((logprobs.float() - old_logprobs.float().detach()).clamp(-20.0, 20.0))
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + upper)
    valid = mask.bool()
    ppo_clipped = (loss_clipped > loss_unclipped) & valid
    covariance = torch.full_like(adv, -torch.inf)
    if valid.any():
        covariance[valid] = _centred_covariance(logprobs, advantages, valid)
    candidates = torch.nonzero(~ppo_clipped & valid & (covariance > clip_cov_lb) & (covariance < clip_cov_ub))  # [n, 2]
    keep = torch.ones_like(adv)
    if len(candidates):
        wanted = max(int(clip_cov_ratio * float(mask.float().sum())), 1)
        # On the CPU generator, as verl draws it: the same seed picks the same tokens on any device.
        chosen = candidates[torch.randperm(len(candidates), device="cpu")[:wanted].to(candidates.device)]
        keep[chosen[:, 0], chosen[:, 1]] = 0.0
    per_token = torch.maximum(loss_unclipped, loss_clipped) * keep
    stats = {"clip_frac": float(masked_mean(ppo_clipped.float(), mask)),
             "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
             "clip_cov/selected_frac": float(masked_mean(1.0 - keep, mask))}
    return agg_loss(_weighted(per_token, token_weights), mask, loss_agg_mode, norm_length), stats


@POLICY_LOSSES.register("kl_cov")
def kl_cov_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, kl_cov_ratio: float = 2e-3,
    ppo_kl_coef: float = 1.0, loss_agg_mode: str = "token-mean", norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL-Cov (Cui et al. 2025): the unclipped ratio objective, with a KL penalty on the tokens of
    largest covariance.

    r_t = exp(lp - old);   cov_t = (A_t - mean A)(lp_t - mean lp)   (over the real tokens of this call)
    S = the max(1, floor(kl_cov_ratio * real tokens)) real tokens of largest cov_t
    per-token loss = -A r_t + [t in S] ppo_kl_coef |lp_t - old_t|
    No token is clipped: only S is held near the old policy. Defaults are the paper's recipe for
    Qwen2.5-7B (k = 2e-3, coefficient 1; verl's config defaults 2e-4 and 0.1, its function's 2e-4
    and 1). logprobs, old_logprobs, advantages, mask, token_weights: [B, T] -> (float32 scalar,
    {"clip_frac": 0.0, "approx_kl", "kl_cov/selected_frac": share of real tokens in S}).
    """
    _check_fraction("kl_cov", "kl_cov_ratio", kl_cov_ratio)
    if ppo_kl_coef < 0:
        raise ValueError(f"kl_cov: ppo_kl_coef weighs a penalty and must be >= 0 (paper: 1), got {ppo_kl_coef}")
    adv = advantages.float().detach()
    log_ratio = logprobs.float() - old_logprobs.float().detach()
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    valid = mask.bool()
    selected = torch.zeros_like(adv)
    if valid.any():
        covariance = _centred_covariance(logprobs, advantages, valid)
        wanted = max(1, int(len(covariance) * kl_cov_ratio))
        positions = torch.nonzero(valid.reshape(-1)).squeeze(-1)[torch.topk(covariance, wanted).indices]
        selected.view(-1)[positions] = 1.0
    per_token = -adv * ratio + ppo_kl_coef * log_ratio.abs() * selected
    stats = {"clip_frac": 0.0, "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
             "kl_cov/selected_frac": float(masked_mean(selected, mask))}
    return agg_loss(_weighted(per_token, token_weights), mask, loss_agg_mode, norm_length), stats


# ----------------------------------------------------------------------------------------------
# DPPO: a trust region on the probability gap, not on the ratio
# ----------------------------------------------------------------------------------------------


@POLICY_LOSSES.register("dppo")
def dppo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, divergence: str = "tv",
    clip_range: float | None = None, clip_range_high: float | None = None, ratio_cap: float | None = 20.0,
    loss_agg_mode: str = "token-mean", norm_length: int | None = None, token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Divergence PPO (Qi et al. 2026, "Rethinking the Trust Region in LLM RL", arXiv:2602.04879),
    the Binary-TV and Binary-KL variants (verl's dppo_tv and dppo_kl).

    PPO's ratio band over-restrains rare tokens (a small probability moves the ratio a lot) and
    under-restrains likely ones; DPPO masks a token when the probability itself moved too far:
    p = exp(lp), q = exp(old) (the sampling policy)
    tv:         too far up   = p - q > delta_high;                    down = p - q < -delta_low
    binary_kl:  D = q log(q/p) + (1 - q) log((1 - q + 1e-8)/(1 - p + 1e-8))  (Bernoulli KL of the token)
                too far up   = D > delta_high and p > q;              down = D > delta_low and p < q
    keep_t = not "up" where A_t > 0, not "down" where A_t <= 0   (only the move the advantage pushes)
    per-token loss = -A_t sg[min(r_t, ratio_cap)] lp_t keep_t,   r_t = exp(lp - old)
    so a kept token's gradient is -A grad r (truncated importance sampling above ratio_cap; None =
    no cap). delta_low = clip_range, delta_high = clip_range_high or clip_range; None = the
    paper's threshold (tv 0.15, binary_kl 0.05). verl's ratio_cap default is 20 (its example
    script sets 1e4). q is the rollout policy as the trainer recomputes it (the authors'
    "_recompute" variant); their main runs measure the gap to the sampler's own probabilities,
    which would take old's place here. With one update per rollout and no separate old pass
    old = lp, so nothing is masked and DPPO is plain policy gradient. logprobs, old_logprobs, advantages, mask,
    token_weights: [B, T] -> (float32 scalar, {"clip_frac": share of real tokens masked,
    "approx_kl", "dppo/truncated_frac": share of kept real tokens whose ratio was capped}).
    """
    if divergence not in DPPO_DIVERGENCES:
        raise ValueError(f"dppo: divergence must be one of {', '.join(DPPO_DIVERGENCES)}, got {divergence!r}")
    low = DPPO_DIVERGENCES[divergence] if clip_range is None else clip_range
    high = low if clip_range_high is None else clip_range_high
    if not (low > 0 and high > 0):
        raise ValueError(f"dppo: clip_range and clip_range_high are divergence thresholds and must be > 0 "
                         f"(paper: tv 0.15, binary_kl 0.05), got {low}, {high}")
    if ratio_cap is not None and not ratio_cap > 1.0:
        raise ValueError(f"dppo: ratio_cap truncates the importance ratio and must be > 1 or none (verl: 20), "
                         f"got {ratio_cap}")
    adv = advantages.float().detach()
    lp, old = logprobs.float(), old_logprobs.float().detach()
    ratio = torch.exp((lp.detach() - old).clamp(-20.0, 20.0))
    weight = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
    p, q = torch.exp(lp.detach()), torch.exp(old)
    if divergence == "tv":
        up, down = p - q > high, p - q < -low
    else:
        binary_kl = q * (old - lp.detach()) + (1.0 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
        up, down = (binary_kl > high) & (p > q), (binary_kl > low) & (p < q)
    keep = (~torch.where(adv > 0, up, down)).float()
    per_token = -adv * weight * lp * keep
    truncated = (ratio > ratio_cap).float() * keep if ratio_cap is not None else torch.zeros_like(keep)
    stats = {"clip_frac": float(masked_mean(1.0 - keep, mask)),
             "approx_kl": _approx_kl(logprobs, old_logprobs, mask),
             "dppo/truncated_frac": float(masked_mean(truncated, mask))}
    return agg_loss(_weighted(per_token, token_weights), mask, loss_agg_mode, norm_length), stats
