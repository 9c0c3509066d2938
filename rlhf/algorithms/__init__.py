"""Policy-gradient math for RL fine-tuning of language models, as pure tensor functions.

Nothing here knows about models, tokenizers or Accelerate (the package imports only torch):
every function maps tensors to tensors, so the trainer, the tests and user code can call them
alike.

Vocabulary and shapes (used in every docstring):
    B             number of sequences (responses) in the batch
    T             number of response tokens (padded)
    mask          [B, T] float/bool, 1 = real response token, 0 = padding after EOS
    token_rewards [B, T] per-token rewards (score at the last real token, process rewards on
                  their tokens, minus the KL penalty)
    logprobs      [B, T] log pi_theta(a_t | s_t) of the sampled tokens
    old_logprobs  [B, T] the same under the policy that generated the rollout
    ref_logprobs  [B, T] the same under the frozen reference policy
    values        [B, T] critic estimates V(s_t)
    advantages    [B, T], returns [B, T]
    group_ids     [B] integer id of the prompt group each sequence belongs to

Inputs may be float32 or bfloat16; anything that reduces or accumulates runs and returns in
float32 so that low-precision activations never decide the loss math. No function changes its
inputs in place.

Modules: registry (name -> function, with what each needs), aggregation (masked statistics,
agg_loss), kl, advantages (estimators, reward shaping, baseline), losses (policy and value
losses), verl_losses (GMPO, Clip-Cov, KL-Cov, DPPO), logits, trpo. Adding a policy loss or an
estimator = one decorated function in losses.py / advantages.py (or your own module) plus its test.
"""

from rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS, MovingAverageBaseline, discounted_returns, dr_grpo_advantages, gae_advantages,
    grpo_advantages, group_stats, last_token_index, reinforce_advantages, reinforce_pp_advantages, rloo_advantages,
    sequence_scores, token_level_rewards, zero_spread_groups,
)
from rlhf.algorithms.aggregation import (
    LOSS_AGG_MODES, agg_loss, agg_units, masked_mean, masked_sum, masked_var, masked_whiten, whiten_with_stats,
)
from rlhf.algorithms.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty
from rlhf.algorithms.logits import (
    entropy_from_logits, logprobs_and_entropy_from_logits, logprobs_from_hidden, logprobs_from_logits,
)
from rlhf.algorithms.losses import POLICY_LOSSES, pg_loss, ppo_clip_loss, value_loss
from rlhf.algorithms import verl_losses  # noqa: F401  registers gmpo, clip_cov, kl_cov, dppo
from rlhf.algorithms.registry import Algorithm, Registry, declared_kwargs
from rlhf.algorithms.trpo import (
    backtracking_line_search, categorical_kl, conjugate_gradient, trpo_step, trpo_step_size, trpo_surrogate_loss,
)

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "masked_whiten", "whiten_with_stats", "agg_loss", "agg_units",
    "declared_kwargs", "LOSS_AGG_MODES", "kl_penalty", "KL_ESTIMATORS", "token_level_rewards", "last_token_index",
    "FixedKLController", "AdaptiveKLController", "MovingAverageBaseline", "discounted_returns", "sequence_scores",
    "group_stats", "zero_spread_groups", "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "Registry", "Algorithm",
    "reinforce_advantages", "gae_advantages", "grpo_advantages", "dr_grpo_advantages", "rloo_advantages",
    "reinforce_pp_advantages", "pg_loss", "ppo_clip_loss", "value_loss", "entropy_from_logits",
    "logprobs_from_logits", "logprobs_and_entropy_from_logits", "logprobs_from_hidden", "conjugate_gradient", "trpo_step_size",
    "backtracking_line_search", "trpo_surrogate_loss", "categorical_kl", "trpo_step",
]
