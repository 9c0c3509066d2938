"""TRL 1.16's own GRPOTrainer._compute_loss on given tensors: the peer our losses must equal.

``trl_loss`` calls the real (unbound) ``GRPOTrainer._compute_loss`` on a stub ``self`` that carries
exactly the attributes that method reads, with TRL's own get_off_policy_mask,
get_high_entropy_mask and get_gamma_weights bound from the class. The model forward is replaced by
``_get_per_token_logps_and_entropies`` returning the given logprobs and entropies, so the loss and
its gradient with respect to them are TRL's on identical inputs. One process, one micro-batch
(gradient_accumulation_steps = steps_per_generation = 1), train mode.

``batch`` makes the inputs: random tensors shaped like one batch of a tiny model, B = 8 responses
in groups of 4, T = 7 tokens with a ragged mask; logprobs and entropies come from random logits over
a vocabulary of 11 (so each entropy belongs to its logprob's distribution).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

B, T, V, GROUP = 8, 7, 11, 4


def batch(seed: int = 0, drift: float = 0.3) -> dict[str, Tensor]:
    """One batch: logprobs (the current policy), old/ref/sampler logprobs nearby (``drift`` apart),
    group-relative advantages [B], a ragged mask (lengths 7, 3, 5, 1, ...), entropies, IS ratios."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    labels = torch.randint(0, V, (B, T), generator=g)
    log_probs = torch.log_softmax(logits, -1)
    logprobs = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    scores = torch.randn(B, generator=g)
    grouped = scores.view(-1, GROUP)
    advantages = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)).view(-1)

    def near(scale: float) -> Tensor:
        return logprobs + scale * torch.randn(B, T, generator=g)

    return {"logprobs": logprobs, "old_logprobs": near(drift), "ref_logprobs": near(0.5),
            "sampler_logprobs": near(drift * 1.5), "advantages": advantages, "mask": mask, "entropy": entropy,
            "is_ratio": torch.exp(0.2 * torch.randn(B, T, generator=g)).clamp(max=3.0) * mask + (1 - mask)}


class _Accelerator:
    """One process: gather/reduce are the identity, as Accelerate's are on one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor

    def pad_across_processes(self, tensor: Tensor, dim: int = 0, pad_index: float = 0) -> Tensor:
        return tensor


def _stub(loss_type: str, level: str, *, beta: float, epsilon: float, epsilon_high: float | None,
          top_entropy_quantile: float, off_policy_mask_threshold: float | None, use_vllm: bool,
          entropy_coef: float, use_adaptive_entropy: bool, last_world_entropy: float, args: dict[str, Any]) -> Any:
    from trl import GRPOTrainer

    class Stub:
        _compute_loss = GRPOTrainer._compute_loss
        get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
        get_off_policy_mask = GRPOTrainer.__dict__["get_off_policy_mask"]  # staticmethods, as in the class
        get_gamma_weights = GRPOTrainer.__dict__["get_gamma_weights"]

    stub = Stub()
    defaults = {"delta": None, "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0,
                "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0, "use_bias_correction_kl": True,
                "entropy_target": 0.2, "entropy_coef_min": 0.0, "entropy_coef_max": 1.0, "entropy_coef_delta": 0.005,
                "steps_per_generation": 1}
    stub.args = SimpleNamespace(**{**defaults, **args})
    stub.loss_type, stub.importance_sampling_level, stub.beta = loss_type, level, beta
    stub.epsilon_low = epsilon
    stub.epsilon_high = epsilon_high if epsilon_high is not None else epsilon  # GRPOTrainer.__init__
    stub.top_entropy_quantile, stub.off_policy_mask_threshold = top_entropy_quantile, off_policy_mask_threshold
    stub.use_vllm, stub.vllm_importance_sampling_correction = use_vllm, use_vllm
    stub.aux_loss_enabled = False
    stub.entropy_coef, stub.use_adaptive_entropy = entropy_coef, use_adaptive_entropy
    stub._entropy_bonus_enabled = entropy_coef != 0.0 or use_adaptive_entropy
    stub._last_world_entropy, stub._entropy_window_stats = last_world_entropy, None
    stub.accelerator = _Accelerator()
    stub.current_gradient_accumulation_steps = 1
    stub.max_completion_length = T
    stub.model = SimpleNamespace(training=True)
    stub._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return stub


def trl_loss(loss_type: str, level: str = "token", data: dict[str, Tensor] | None = None, *,
             old: bool = True, beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
             top_entropy_quantile: float = 1.0, off_policy_mask_threshold: float | None = None,
             sampler: bool = False, is_ratio: bool = False, entropy_coef: float = 0.0,
             use_adaptive_entropy: bool = False, last_world_entropy: float = math.inf,
             **args: Any) -> dict[str, Any]:
    """TRL's loss on ``data`` (default ``batch()``) -> {"loss", "grad_logprobs", "grad_entropy",
    "metrics", "stub"}. old=False leaves old_per_token_logps out (TRL then uses the detached
    logprobs); sampler / is_ratio pass the sampler's logprobs / vLLM IS ratios (use_vllm on);
    ``args`` are GRPOConfig fields (delta, sapo_*, vespo_*, use_bias_correction_kl, entropy_*)."""
    data = batch() if data is None else data
    stub = _stub(loss_type, level, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                 top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=off_policy_mask_threshold,
                 use_vllm=is_ratio, entropy_coef=entropy_coef, use_adaptive_entropy=use_adaptive_entropy,
                 last_world_entropy=last_world_entropy, args=args)
    logprobs = data["logprobs"].clone().requires_grad_(True)
    entropy = data["entropy"].clone().requires_grad_(True)
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropy, None)
    mask = data["mask"]
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": data["advantages"], "num_items_in_batch": mask.sum()}
    if old:
        inputs["old_per_token_logps"] = data["old_logprobs"]
    if beta:
        inputs["ref_per_token_logps"] = data["ref_logprobs"]
    if sampler:
        inputs["sampling_per_token_logps"] = data["sampler_logprobs"]
    if is_ratio:
        inputs["importance_sampling_ratio"] = data["is_ratio"]
    loss = stub._compute_loss(None, inputs)
    loss.backward()
    metrics = {key: values[-1] for key, values in stub._metrics["train"].items()}
    return {"loss": loss.detach(), "grad_logprobs": logprobs.grad,
            "grad_entropy": torch.zeros_like(entropy) if entropy.grad is None else entropy.grad,
            "metrics": metrics, "stub": stub}
