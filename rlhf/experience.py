"""make_experience: a scored rollout -> everything the update needs.

    old logprobs, values, entropy   no-grad pass with the LoRA on (skipped when the update's own
                                    forward gives them: see ``plan_passes``)
    reference logprobs              no-grad pass with the LoRA off (when KL is used)
    loss mask                       rollout mask minus dropped zero-spread groups and unscorable samples
    token rewards                   outcome score on the last token + process rewards - beta * KL
    advantages, returns             the registered estimator; baseline update; global whitening
    sampler mismatch, IS weights    the sampler's logprobs (rollout.sampler_logprobs) against the
                                    old logprobs: metrics, and the importance-sampling correction
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhf.algorithms import Algorithm, MovingAverageBaseline, group_stats, kl_penalty, masked_whiten
from rlhf.algorithms import token_level_rewards, zero_spread_groups
from rlhf.distributed import Reducer, unwrapped_full_weights
from rlhf.models import adapters_off
from rlhf.rollout import Rollout, forward_response
from rlhf.scoring import fill_unscorable


@dataclass
class Experience:
    """A scored rollout with everything the update needs; all [B, T] unless noted."""

    rollout: Rollout
    old_logprobs: Tensor | None  # None: the update takes them from its own forward (plan_passes)
    ref_logprobs: Tensor | None
    values: Tensor | None
    advantages: Tensor
    returns: Tensor
    loss_mask: Tensor  # rollout.mask without the rows of dropped (zero-spread) groups
    sampler_logprobs: Tensor | None = None  # the sampler's logprob of each sampled token, 0 on padding
    # Importance-sampling correction of the policy loss per token (importance_sampling_weights;
    # a sequence mode's row weight on each of its tokens); None when the correction is off.
    is_weights: Tensor | None = None


@dataclass(frozen=True)
class Passes:
    """The no-grad forward passes every step runs, decided once from the settings and the registry."""

    old: bool  # logprobs of the rollout policy (with values and entropy)
    reference: bool  # logprobs of the reference policy (LoRA off)


def plan_passes(config: Any, estimator: Algorithm, updater: Algorithm) -> Passes:
    """With one epoch and one minibatch the policy is still the rollout's policy when the update's
    forward runs, so the old logprobs are exactly that forward's detached logprobs (ratio 1, the
    same gradient) and the separate no-grad pass is skipped. It is needed when values feed the
    estimator, when KL to the reference goes into the reward, when the updater asks for it, and for
    the importance-sampling correction, whose weights are known before the update starts (TRL too
    runs that pass whenever it corrects)."""
    reference = config.kl_coef > 0 or config.adaptive_kl_target is not None
    single_update = (config.ppo_epochs == 1
                     and config.mini_batch_size == config.rollout_batch_size * config.num_generations)
    old = (not single_update or updater.needs["old_logprobs"] or estimator.needs["values"]
           or (reference and config.kl_in_reward) or config.importance_sampling_correction != "none")
    return Passes(old=old, reference=reference)


@torch.no_grad()
def make_experience(model: torch.nn.Module, rollout: Rollout, scores: Tensor, *, config: Any, passes: Passes,
                    estimator: Algorithm, kl_coef: float, baseline: MovingAverageBaseline, reducer: Reducer,
                    micro_batch_size: int, token_scores: Tensor | None = None) -> tuple[Experience, dict[str, float]]:
    """scores [B] (outcome), token_scores [B, T] | None (process rewards) -> (Experience, metrics)."""
    if passes.old:
        old_logprobs, values, entropy = no_grad_pass(model, rollout, config, reducer, micro_batch_size,
                                                     with_adapter=True, with_entropy=True)
    else:
        old_logprobs, values, entropy = None, None, None
    ref_logprobs = (no_grad_pass(model, rollout, config, reducer, micro_batch_size, with_adapter=False)[0]
                    if passes.reference else None)
    mask = rollout.mask
    scores, scorable = fill_unscorable(scores, rollout.group_ids)  # every reward said "not applicable"
    loss_mask, group_metrics = filter_groups(scores if token_scores is None else scores + token_scores.sum(-1),
                                             rollout, config, reducer)
    loss_mask = loss_mask * scorable.unsqueeze(-1).to(loss_mask.dtype)
    if config.mask_truncated_completions:  # cut-off responses teach nothing about how to finish (DAPO)
        loss_mask = loss_mask * rollout.eos_found.unsqueeze(-1).to(loss_mask.dtype)
    kl = (kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator, mask)
          if ref_logprobs is not None and old_logprobs is not None else None)
    token_rewards = token_level_rewards(scores, mask, kl=kl, kl_coef=kl_coef if config.kl_in_reward else 0.0)
    if token_scores is not None:
        token_rewards = token_rewards + token_scores.float() * mask.float()
    advantages, returns = estimate(estimator, token_rewards, mask, values, rollout, baseline.value, reducer,
                                   config.advantage_settings())
    baseline.update(reducer.gather(returns[:, 0]))
    if config.whiten_advantages:  # over all processes (TRL whitens per rank, RL_NOTES 10)
        advantages = masked_whiten(advantages, loss_mask, all_reduce=reducer.sum)
    metrics = {**group_metrics, "adv_mean": reducer.token_mean(advantages, mask), "kl_coef": kl_coef}
    sampler_logprobs, is_weights = rollout.sampler_logprobs, None
    if old_logprobs is not None:  # else the update measures these on the same forward
        metrics["kl"] = reducer.mean(kl.sum(-1).mean()) if kl is not None else math.nan
        metrics["entropy"] = reducer.token_mean(entropy, mask)
        if sampler_logprobs is not None:
            metrics.update(sampler_mismatch_metrics(sampler_mismatch_totals(old_logprobs, sampler_logprobs, mask),
                                                    reducer))
    if config.importance_sampling_correction != "none":
        if sampler_logprobs is None:  # every sampler here records them; a hand-made Rollout may not
            raise ValueError("importance_sampling_correction needs the rollout's sampler_logprobs")
        mode = config.importance_sampling_correction
        is_weights = importance_sampling_weights(old_logprobs, sampler_logprobs, mask, mode,
                                                 config.importance_sampling_min, config.importance_sampling_max)
        metrics.update(importance_sampling_metrics(is_weights, mask, mode, reducer))
        # TRL's names for the mismatch it logs with the correction (the same numbers as sampler/*)
        metrics["sampling/sampling_logp_difference/mean"] = metrics["sampler/logprob_abs_diff_mean"]
        metrics["sampling/sampling_logp_difference/max"] = metrics["sampler/logprob_abs_diff_max"]
    return Experience(rollout, old_logprobs, ref_logprobs, values, advantages, returns, loss_mask,
                      sampler_logprobs, is_weights), metrics


def estimate(estimator: Algorithm, token_rewards: Tensor, mask: Tensor, values: Tensor | None, rollout: Rollout,
             baseline: float, reducer: Reducer, settings: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The registered estimator -> (advantages, returns), each [B, T].

    In multi-turn episodes the tool/environment tokens between turns are part of the state, not
    actions: the estimator runs on the sampled tokens alone, moved together
    (rlhf.episodes.actions.compact_actions), so GAE bootstraps a turn's last token from the next
    turn's first sampled token and gamma/lambda discount once per action; the result goes back to
    the sampled positions (0 on tool tokens). One-turn rollouts are passed as they are.
    """
    if rollout.episode_mask is None:
        return estimator(token_rewards, mask, values=values, group_ids=rollout.group_ids, baseline=baseline,
                         all_reduce=reducer.sum, **settings)
    from rlhf.episodes.actions import compact_actions, expand_actions

    actions_rewards, actions_mask = compact_actions(token_rewards, mask)
    actions_values = compact_actions(values, mask)[0] if values is not None else None
    advantages, returns = estimator(actions_rewards, actions_mask, values=actions_values, group_ids=rollout.group_ids,
                                    baseline=baseline, all_reduce=reducer.sum, **settings)
    return expand_actions(advantages, mask), expand_actions(returns, mask)


# ------------------------------------------------------------------ the sampler against the trainer

IMPORTANCE_SAMPLING_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_sampling_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: str,
                                min_ratio: float | None, max_ratio: float | None) -> Tensor:
    """Per-token weights [B, T] that correct the policy loss for sampling from a distribution mu
    (the sampler: merged LoRA, bfloat16, another engine) other than the trainer's pi_old.

    old_logprobs, sampler_logprobs, mask: [B, T]. With d = (log pi_old - log mu) * mask:
        token_*     rho_t = exp(d_t)                  one ratio per token
        sequence_*  rho   = exp(sum_t d_t)            one ratio per sequence, on each of its tokens
        *_truncate  rho <- clamp(rho, min, max)       truncated IS (TIS; Yao et al. 2025)
        *_mask      rho <- 0 outside [min, max]       masked IS (MIS / IcePop): drop the token / sequence
    A bound of None is open (a mask keeps that side; a truncation does not clip it). The same
    computation as TRL 1.16's GRPOTrainer._generate_and_score_completions (vllm_importance_sampling_*),
    whose sequence weight is [B, 1]; here it is broadcast to [B, T]. Tokens outside ``mask`` get a
    token ratio of 1 (d = 0) as in TRL; the loss mask leaves them out anyway.
    """
    if mode not in IMPORTANCE_SAMPLING_MODES[1:]:
        raise ValueError(f"importance_sampling_correction {mode!r} is not one of: "
                         f"{', '.join(IMPORTANCE_SAMPLING_MODES[1:])}")
    if mode.endswith("truncate") and min_ratio is None and max_ratio is None:
        raise ValueError(f"{mode} needs a bound: set importance_sampling_min or importance_sampling_max")
    diff = (old_logprobs - sampler_logprobs) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)  # [B, 1]
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=min_ratio, max=max_ratio)
    else:
        low = -math.inf if min_ratio is None else min_ratio
        high = math.inf if max_ratio is None else max_ratio
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    return ratio.expand_as(old_logprobs).contiguous()


def sampler_mismatch_totals(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """This process's sums for the sampler-vs-trainer metrics (sampler_mismatch_metrics turns them
    into global ones; sums from several micro-batches add up, maxima take the max).

    logprobs: [B, T] the trainer's (old) logprobs; sampler_logprobs: [B, T]; mask: [B, T] real
    response tokens. With d = lp - lp_mu, k3 = exp(d) - d - 1 >= 0 estimates KL(mu || pi) per token
    from tokens drawn from mu (Schulman 2020; rlhf.algorithms.kl_penalty's k3). It is ~d^2 / 2, so
    it is taken as expm1(d) - d in float64: in float32 a d of 1e-6 would give exactly 0.
    """
    real = mask.bool()
    diff = logprobs.double()[real] - sampler_logprobs.double()[real]
    capped = diff.clamp(-20.0, 20.0)  # as kl_penalty: one outlier token cannot overflow exp to inf
    k3 = torch.expm1(capped) - capped
    return {"sampler_kl_sum": float(k3.sum()), "sampler_abs_diff_sum": float(diff.abs().sum()),
            "sampler_tokens": float(real.sum()),
            "sampler_abs_diff_max": float(diff.abs().max()) if diff.numel() else 0.0}


def sampler_mismatch_metrics(totals: dict[str, float], reducer: Reducer) -> dict[str, float]:
    """Global sampler/kl (mean k3 per response token), sampler/logprob_abs_diff_mean and _max from
    each process's sampler_mismatch_totals. ~0 when the sampler is the trainer's float32 forward;
    it grows with what differs in sampling (bfloat16, merged-LoRA rounding, another engine)."""
    kl_sum, abs_sum, tokens = reducer.sum([totals["sampler_kl_sum"], totals["sampler_abs_diff_sum"],
                                           totals["sampler_tokens"]]).tolist()
    return {"sampler/kl": kl_sum / max(tokens, 1.0), "sampler/logprob_abs_diff_mean": abs_sum / max(tokens, 1.0),
            "sampler/logprob_abs_diff_max": reducer.max(totals["sampler_abs_diff_max"])}


def importance_sampling_metrics(weights: Tensor, mask: Tensor, mode: str, reducer: Reducer) -> dict[str, float]:
    """TRL's sampling/importance_sampling_ratio/min, mean, max of the weights after truncation or
    masking: over real tokens (token modes) or over sequences (sequence modes, one value each).

    weights, mask: [B, T]. Min and max are global; the mean is over every process's values
    together (TRL averages the per-process means, which is the same when processes hold as many)."""
    values = weights[:, 0] if mode.startswith("sequence") else weights[mask.bool()]
    total, count = reducer.sum([float(values.sum()), float(values.numel())]).tolist()
    # a process without values leaves the global extremes alone; none anywhere gives 0, as TRL's
    low = -reducer.max(-float(values.min()) if values.numel() else -math.inf)
    high = reducer.max(float(values.max()) if values.numel() else -math.inf)
    if count == 0:
        return dict.fromkeys(("sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                              "sampling/importance_sampling_ratio/max"), 0.0)
    return {"sampling/importance_sampling_ratio/min": low, "sampling/importance_sampling_ratio/mean": total / count,
            "sampling/importance_sampling_ratio/max": high}


def filter_groups(scores: Tensor, rollout: Rollout, config: Any, reducer: Reducer) -> tuple[Tensor, dict[str, float]]:
    """Groups (samples of one prompt) whose scores are all equal get zero group-relative
    advantage: count them, and with filter_zero_std_groups drop them from the update."""
    if config.num_generations < 2:
        return rollout.mask, {}
    zero_spread = zero_spread_groups(scores, rollout.group_ids)
    counts = group_stats(scores, rollout.group_ids)[1]
    # Each group lives on one process, so per-process group counts add up (a group of n samples
    # contributes n * 1/n).
    totals = reducer.sum(torch.stack([(zero_spread.float() / counts).sum(), (1.0 / counts).sum()]))
    metrics = {"frac_reward_zero_std": float(totals[0] / totals[1])}
    if not (config.filter_zero_std_groups or config.dynamic_sampling):
        return rollout.mask, metrics
    return rollout.mask * (~zero_spread).unsqueeze(-1).to(rollout.mask.dtype), metrics


def no_grad_pass(model: torch.nn.Module, rollout: Rollout, config: Any, reducer: Reducer, micro_batch_size: int,
                 with_adapter: bool, with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Logprobs [B, T], values [B, T] | None, entropy [B, T] | None in chunks, no grad.

    with_adapter=False is the reference policy: the same weights with LoRA switched off, so there
    is one copy of the base model in memory.
    """
    chunk = config.logprob_batch_size or micro_batch_size
    logprobs, values, entropy = [], [], []
    with unwrapped_full_weights(model, reducer.accelerator) as plain, \
            contextlib.nullcontext() if with_adapter else adapters_off(plain.policy):
        for start in range(0, len(rollout), chunk):
            rows = slice(start, start + chunk)
            if with_adapter:
                lp, v, h = forward_response(plain, rollout, rows, config.temperature, with_entropy=with_entropy)
                values.append(v)
                entropy.append(h)
            else:
                lp, _, _ = forward_response(plain, rollout, rows, config.temperature)
            logprobs.append(lp)
    has_values = with_adapter and plain.value_head is not None
    return (torch.cat(logprobs), torch.cat(values) if has_values else None,
            torch.cat(entropy) if with_adapter and with_entropy else None)
