"""TRPO's update (Schulman et al. 2015) on the LoRA parameters: a natural-gradient step inside a
KL trust region, from the pure pieces below (CG, step size, line search).

    g      = grad L(theta_old)                      L = surrogate loss (minimised), below
    F v    = grad (grad KLbar(theta_old || theta) . v) + damping * v    (double backward)
    s      = conjugate_gradient(F, -g)              s ~ F^-1 (-g), the natural-gradient direction
    beta   = trpo_step_size(s, F s, max_kl)         0.5 beta^2 s'Fs = max_kl
    theta  = backtracking_line_search(L, theta_old, beta s, expected = -g . beta s,
                                      constraint = measured KLbar <= max_kl)

KLbar is the mean over response tokens of the exact categorical KL between the old and the new
next-token distributions (full vocabulary), so its Hessian at theta_old is the Fisher matrix; the
sampled-token estimate (k1) would have an indefinite Hessian. Under several processes every sum
goes through ``all_reduce`` so all processes take the identical step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from rlhf.algorithms.aggregation import agg_loss, agg_units, masked_sum
from rlhf.algorithms.kl import kl_penalty

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


def trpo_surrogate_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
) -> Tensor:
    """Importance-sampled surrogate to minimise: L = -agg( exp(lp - old) * A ).

    logprobs, old_logprobs, advantages, mask: [B, T] -> float32 scalar. At theta = theta_old its
    gradient is the policy-gradient estimator -agg(A * grad log pi); unlike PPO nothing is
    clipped, the trust region is enforced by the line search instead.
    """
    ratio = torch.exp((logprobs.float() - old_logprobs.float().detach()).clamp(-20.0, 20.0))
    return agg_loss(-advantages.float().detach() * ratio, mask, loss_agg_mode, norm_length)


def categorical_kl(old_logprobs_full: Tensor, new_logprobs_full: Tensor) -> Tensor:
    """Exact per-token KL(old || new) = sum_v p_old(v) (log p_old(v) - log p_new(v)).

    old_logprobs_full, new_logprobs_full: [B, T, V] log-softmax outputs -> [B, T] float32.
    """
    old = old_logprobs_full.float().detach()
    return (old.exp() * (old - new_logprobs_full.float())).sum(-1)


def trpo_step(
    params: list[Tensor],
    policy_logprobs_full: Callable[[Tensor], Tensor],
    micro_batches: list[Tensor],
    response_ids: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    max_kl: float,
    cg_iters: int = 10,
    cg_damping: float = 0.1,
    line_search_backtracks: int = 10,
    line_search_accept_ratio: float = 0.1,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    fisher_rows: Tensor | None = None,
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> dict[str, float]:
    """One TRPO step; updates ``params`` in place and returns diagnostics.

    params: the trainable (LoRA) tensors. policy_logprobs_full(rows) -> [b, T, V] temperature-
    scaled log-softmax of the current policy for rollout rows ``rows`` (with grad).
    micro_batches: row-index tensors covering this process's rollout. response_ids, old_logprobs,
    advantages, mask: [B, T]. loss_agg_mode, norm_length: as in ``agg_loss``. ref_logprobs with
    kl_coef > 0 adds kl_coef * agg(KL to reference) to the surrogate (GRPO-style KL loss). fisher_rows: the rows whose KL Hessian estimates the
    Fisher matrix (None = all; a subsample makes each CG iteration proportionally cheaper, as in
    OpenAI baselines' TRPO). all_reduce sums a tensor over processes.

    Returns {"policy_loss", "trpo/accepted", "trpo/line_search_steps", "trpo/kl_after_step",
    "trpo/expected_improve", "trpo/actual_improve", "trpo/step_size", "trpo/grad_norm"}.
    """
    global_units = float(all_reduce(agg_units(mask, loss_agg_mode)))
    global_tokens = float(all_reduce(mask.sum().float()))
    if global_units == 0 or global_tokens == 0:
        return {"trpo/accepted": 0.0, "trpo/line_search_steps": 0.0, "trpo/kl_after_step": 0.0}

    def surrogate(rows: Tensor, full: Tensor) -> Tensor:
        """This micro-batch's share of the global surrogate (sums to L over all rows and processes)."""
        logprobs = full.gather(-1, response_ids[rows].unsqueeze(-1)).squeeze(-1)
        rows_mask = mask[rows]
        loss = trpo_surrogate_loss(logprobs, old_logprobs[rows], advantages[rows], rows_mask, loss_agg_mode,
                                   norm_length)
        if ref_logprobs is not None and kl_coef > 0:
            kl = kl_penalty(logprobs, ref_logprobs[rows], kl_estimator)
            loss = loss + kl_coef * agg_loss(kl, rows_mask, loss_agg_mode, norm_length)
        return loss * agg_units(rows_mask, loss_agg_mode) / global_units

    def mean_kl(rows: Tensor, old_full: Tensor, full: Tensor) -> Tensor:
        return masked_sum(categorical_kl(old_full, full), mask[rows]) / global_tokens

    # Gradient of the surrogate; the old distributions are kept for the line search's KL.
    theta_old = parameters_to_vector(params).detach()
    gradient = torch.zeros_like(theta_old, dtype=torch.float32)
    loss_old = torch.zeros((), device=theta_old.device)
    old_fulls = []
    for rows in micro_batches:
        # All passes use the math attention kernel: the fused ones (flash, memory-efficient) have
        # no double backward, and one kernel everywhere keeps the measured KL free of kernel noise.
        with sdpa_kernel(SDPBackend.MATH):
            full = policy_logprobs_full(rows)
        loss = surrogate(rows, full)
        gradient += _flat(torch.autograd.grad(loss, params, allow_unused=True), params)
        loss_old += loss.detach()
        old_fulls.append(full.detach())
    gradient = all_reduce(gradient)
    loss_old = float(all_reduce(loss_old))

    # Graphs of grad KLbar on the Fisher rows, differentiated again in every Fisher-vector product.
    fisher_rows = torch.cat(micro_batches) if fisher_rows is None else fisher_rows
    fisher_tokens = float(all_reduce(mask[fisher_rows].sum().float()))
    kl_gradients = []
    for rows in fisher_rows.split(max(len(r) for r in micro_batches)):
        if len(rows) == 0:  # this process holds none of the Fisher rows
            continue
        with sdpa_kernel(SDPBackend.MATH):
            full = policy_logprobs_full(rows)
        kl = masked_sum(categorical_kl(full.detach(), full), mask[rows]) / max(fisher_tokens, 1.0)
        kl_gradients.append(_flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True), params))

    def fisher_vector_product(vector: Tensor) -> Tensor:
        product = torch.zeros_like(vector)
        for kl_grad in kl_gradients:
            if kl_grad.requires_grad:
                hv = torch.autograd.grad(kl_grad @ vector, params, retain_graph=True, allow_unused=True)
                product += _flat(hv, params)
        return all_reduce(product) + cg_damping * vector

    step_dir = conjugate_gradient(fisher_vector_product, -gradient, iters=cg_iters)
    step_size = trpo_step_size(step_dir, fisher_vector_product(step_dir), max_kl)
    full_step = step_size * step_dir
    expected_improve = float(-(gradient @ full_step))
    del kl_gradients  # frees the double-backward graphs before the line search's forwards

    measured = {"tries": 0}

    @torch.no_grad()
    def evaluate(theta: Tensor) -> float:
        """Surrogate at theta; also records the measured KL for the constraint check."""
        if theta is theta_old:
            measured.update(loss=loss_old, kl=0.0)
            return loss_old
        vector_to_parameters(theta.to(params[0].dtype), params)
        loss = torch.zeros((), device=theta.device)
        kl = torch.zeros((), device=theta.device)
        for rows, old_full in zip(micro_batches, old_fulls):
            with sdpa_kernel(SDPBackend.MATH):  # the same kernel as old_full: no numerical KL floor
                full = policy_logprobs_full(rows)
            loss += surrogate(rows, full)
            kl += mean_kl(rows, old_full, full)
        measured.update(loss=float(all_reduce(loss)), kl=float(all_reduce(kl)), tries=measured["tries"] + 1)
        return measured["loss"]

    # The constraint is checked right after evaluate(candidate), so measured["kl"] is the candidate's.
    accepted, theta_new = backtracking_line_search(
        evaluate, theta_old, full_step, expected_improve, max_backtracks=line_search_backtracks,
        accept_ratio=line_search_accept_ratio, constraint=lambda theta: measured["kl"] <= max_kl,
    )
    with torch.no_grad():  # a rejected search leaves the last candidate loaded
        vector_to_parameters(theta_new.to(params[0].dtype), params)
    return {
        "policy_loss": loss_old,
        "trpo/accepted": float(accepted),
        "trpo/line_search_steps": float(measured["tries"]),
        "trpo/kl_after_step": measured["kl"] if accepted else 0.0,
        "trpo/expected_improve": expected_improve,
        "trpo/actual_improve": loss_old - measured["loss"] if accepted else 0.0,
        "trpo/step_size": step_size,
        "trpo/grad_norm": float(gradient.norm()),
    }


def _flat(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> Tensor:
    """Concatenate gradients into one float32 vector; parameters the loss did not reach give zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])
