"""Policy losses and the value loss."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import agg_loss, masked_mean
from rlhf.algorithms.registry import Registry, variant

POLICY_LOSSES: Registry = Registry("policy loss", inputs=("logprobs", "old_logprobs", "advantages", "mask", "loss_agg_mode", "norm_length"))


# ----------------------------------------------------------------------------------------------
# Policy losses:  fn(logprobs, old_logprobs, advantages, mask, *, <only what it reads>)
#                    -> (float32 scalar loss, stats dict of floats)
# The trainer offers loss_agg_mode, norm_length (the constant of seq-mean-token-sum-norm), the
# flat settings clip_range, clip_range_high, dual_clip, and policy_loss_kwargs. Keyword
# parameters with defaults are the loss's hyperparameters. Aggregate with ``agg_loss`` so that
# the trainer's global normaliser (agg_units) matches.
# ----------------------------------------------------------------------------------------------


def _check_clip_ranges(name: str, clip_range: float, clip_range_high: float | None) -> None:
    if not clip_range > 0 or (clip_range_high is not None and not clip_range_high > 0):
        raise ValueError(f"{name}: clip_range and clip_range_high must be > 0, got {clip_range}, {clip_range_high}")


def _approx_kl(logprobs: Tensor, old_logprobs: Tensor | None, mask: Tensor) -> float:
    if old_logprobs is None:
        return 0.0
    return float(masked_mean(0.5 * (logprobs.detach().float() - old_logprobs.float()) ** 2, mask))


@POLICY_LOSSES.register("pg")
def pg_loss(
    logprobs: Tensor, old_logprobs: Tensor | None, advantages: Tensor, mask: Tensor, *,
    loss_agg_mode: str = "token-mean", norm_length: int | None = None,
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
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.2,
    clip_range_high: float | None = None, dual_clip: float | None = None, loss_agg_mode: str = "token-mean",
    norm_length: int | None = None
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
    _check_clip_ranges("ppo_clip", clip_range, clip_range_high)
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
    loss_agg_mode: str = "seq-mean-token-mean", norm_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, Qwen3): one importance ratio per response.

    s_i = exp( (1/|y_i|) sum_t (lp_{i,t} - old_{i,t}) )      (length-normalised sequence ratio)
    per-sequence loss = max(-A_i s_i, -A_i clamp(s_i, 1 - clip_range, 1 + clip_range_high)),
    spread over row i's tokens and aggregated by ``agg_loss`` (seq-mean-token-mean = the paper's
    mean over responses). A_i is row i's per-token advantage (constant over the row for GRPO).
    The ranges are far smaller than PPO's because a sequence ratio moves less (paper: 3e-4, 4e-4);
    clip_range_high=None means 4/3 x clip_range, the paper's proportion. This is TRL's
    importance_sampling_level="sequence". token_level_gradient=True is GSPO-token (not in TRL;
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
    return agg_loss(per_token, mask, loss_agg_mode, norm_length), stats


gspo_token_loss = POLICY_LOSSES.register("gspo_token")(variant(
    gspo_loss, "gspo_token_loss", token_level_gradient=True, doc="""GSPO-token (Zheng et al. 2025): GSPO's clipping with a per-token advantage.

    gspo_loss with token_level_gradient=True: s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)],
    numerically s_i, gradient of token t = s_i * A_{i,t} * grad log pi(y_t). With A constant over
    a row it equals GSPO. logprobs, old_logprobs, advantages, mask: [B, T] -> (scalar, stats).
    """))


@POLICY_LOSSES.register("cispo")
def cispo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, epsilon_high: float = 5.0,
    epsilon_low: float | None = None, loss_agg_mode: str = "token-mean", norm_length: int | None = None
) -> tuple[Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, 2025): REINFORCE weighted by a clipped, stop-gradient importance ratio.

    r = exp(lp - old);   w = sg[ clamp(r, 1 - epsilon_low, epsilon_high) ]   (no lower bound when
    epsilon_low is None, as in the paper);   per-token loss = -w * A * lp.
    Unlike PPO no token leaves the gradient: a token with a large ratio still learns, with its
    weight capped. epsilon_high is the cap on the ratio itself, as TRL's loss_type="cispo" uses it
    (ScaleRL's eps_max, 5.0); it must exceed 1.
    logprobs, old_logprobs, advantages, mask: [B, T] -> (float32 scalar, {"clip_frac": share of
    tokens whose weight was capped, "approx_kl"}).
    """
    if epsilon_high <= 1.0:
        raise ValueError(f"cispo: epsilon_high caps the importance ratio and must be > 1 (e.g. 5.0), got {epsilon_high}")
    if epsilon_low is not None and not 0.0 <= epsilon_low <= 1.0:
        raise ValueError(f"cispo: epsilon_low must be in [0, 1] or none, got {epsilon_low}")
    ratio = torch.exp((logprobs.float().detach() - old_logprobs.float().detach()).clamp(-20.0, 20.0))
    lower = 0.0 if epsilon_low is None else 1.0 - epsilon_low
    weight = ratio.clamp(min=lower, max=epsilon_high)
    per_token = -weight * advantages.float().detach() * logprobs.float()
    stats = {"clip_frac": float(masked_mean((weight != ratio).float(), mask)),
             "approx_kl": _approx_kl(logprobs, old_logprobs, mask)}
    return agg_loss(per_token, mask, loss_agg_mode, norm_length), stats
