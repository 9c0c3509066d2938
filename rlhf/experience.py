"""make_experience: a scored rollout -> everything the update needs.

    old logprobs, values, entropy   no-grad pass with the LoRA on (skipped when the update's own
                                    forward gives them: see ``plan_passes``)
    reference logprobs              no-grad pass with the LoRA off (when KL is used)
    loss mask                       rollout mask minus dropped zero-spread groups and unscorable samples
    token rewards                   outcome score on the last token + process rewards - beta * KL
    advantages, returns             the registered estimator; baseline update; global whitening
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhf.algorithms import Algorithm, MovingAverageBaseline, group_stats, kl_penalty, masked_whiten
from rlhf.algorithms import token_level_rewards, zero_spread_groups
from rlhf.distributed import Reducer, unwrapped_full_weights
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


@dataclass(frozen=True)
class Passes:
    """The no-grad forward passes every step runs, decided once from the settings and the registry."""

    old: bool  # logprobs of the rollout policy (with values and entropy)
    reference: bool  # logprobs of the reference policy (LoRA off)


def plan_passes(config: Any, estimator: Algorithm, updater: Algorithm) -> Passes:
    """With one epoch and one minibatch the policy is still the rollout's policy when the update's
    forward runs, so the old logprobs are exactly that forward's detached logprobs (ratio 1, the
    same gradient) and the separate no-grad pass is skipped. It is needed when values feed the
    estimator, when KL to the reference goes into the reward, and when the updater asks for it."""
    reference = config.kl_coef > 0 or config.adaptive_kl_target is not None
    single_update = (config.ppo_epochs == 1
                     and config.mini_batch_size == config.rollout_batch_size * config.num_generations)
    old = (not single_update or updater.needs["old_logprobs"] or estimator.needs["values"]
           or (reference and config.kl_in_reward))
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
    advantages, returns = estimator(token_rewards, mask, values=values, group_ids=rollout.group_ids,
                                    baseline=baseline.value, all_reduce=reducer.sum, **config.advantage_settings())
    baseline.update(reducer.gather(returns[:, 0]))
    if config.whiten_advantages:  # over all processes (TRL whitens per rank, RL_NOTES 10)
        advantages = masked_whiten(advantages, loss_mask, all_reduce=reducer.sum)
    metrics = {**group_metrics, "adv_mean": reducer.token_mean(advantages, mask), "kl_coef": kl_coef}
    if old_logprobs is not None:  # else the update measures both on the same forward
        metrics["kl"] = reducer.mean(kl.sum(-1).mean()) if kl is not None else math.nan
        metrics["entropy"] = reducer.token_mean(entropy, mask)
    return Experience(rollout, old_logprobs, ref_logprobs, values, advantages, returns, loss_mask), metrics


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
    with unwrapped_full_weights(model, reducer.accelerator) as plain:
        for start in range(0, len(rollout), chunk):
            rows = slice(start, start + chunk)
            if with_adapter:
                lp, v, h = forward_response(plain, rollout, rows, config.temperature, with_entropy=with_entropy)
                values.append(v)
                entropy.append(h)
            else:
                with plain.policy.disable_adapter():
                    lp, _, _ = forward_response(plain, rollout, rows, config.temperature)
            logprobs.append(lp)
    has_values = with_adapter and plain.value_head is not None
    return (torch.cat(logprobs), torch.cat(values) if has_values else None,
            torch.cat(entropy) if with_adapter and with_entropy else None)
