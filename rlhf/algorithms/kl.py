"""KL to the reference policy: per-token estimators and the fixed/adaptive coefficient."""

from __future__ import annotations

import torch
from torch import Tensor

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
