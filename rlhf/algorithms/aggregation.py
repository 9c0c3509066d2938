"""Masked statistics and loss aggregation: the one place that decides what a loss averages over.

Shapes: x, loss, mask are [B, T] (B sequences, T padded response tokens; mask 1 = real token).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

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
        mean, var = masked_mean(x, mask_f), masked_var(x, mask_f)
    else:
        # Two reductions (mean, then squared deviations from it): the one-pass E[x^2] - E[x]^2
        # loses the variance in float32 when the mean is large against the spread.
        total, count = all_reduce(torch.stack([masked_sum(x, mask_f), mask_f.sum()])).tolist()
        mean = total / max(count, 1.0)
        sum_sq = float(all_reduce(masked_sum((x.float() - mean) ** 2, mask_f).reshape(1)))
        var = sum_sq / max(count - 1.0, 1.0)
    if not math.isfinite(float(var)) and math.isfinite(float(mean)):
        # finite entries beyond ~1e19 square past float32's range: the variance would be inf and
        # every entry silently 0 (or NaN). Whitening does not depend on the scale: the same of x
        # times a power of two (exact) that brings it within [-1, 1]; only these batches take it
        scale = power_of_two_scale(x, mask_f, all_reduce)
        whitened = masked_whiten(x.float() * scale, mask, True, eps, all_reduce)
        return whitened if shift_mean else (whitened + mean) * mask_f
    return whiten_with_stats(x, mask_f, mean, var, shift_mean, eps)


def power_of_two_scale(x: Tensor, mask: Tensor | None = None,
                       all_reduce: Callable[[Tensor], Tensor] | None = None) -> float:
    """2^-k for the smallest k with 2^k >= the largest |x| (where mask is set; over every process
    with ``all_reduce``, a sum): x * 2^-k is exact (a power of two) and within [-1, 1], where
    squares and their sums cannot overflow float32. 1.0 when x is all 0.

    x: any shape, finite; mask: x's shape or None.
    """
    magnitudes = x.float().abs() if mask is None else (x.float() * mask.float()).abs()
    # scaled by 2^-64 (exact) so that a sum of every process's largest stays finite
    largest = (magnitudes.max() if magnitudes.numel() else magnitudes.new_zeros(())).reshape(1) * 2.0 ** -64
    largest = all_reduce(largest) if all_reduce is not None else largest
    bound = float(largest[0]) * 2.0 ** 64
    return 2.0 ** -math.ceil(math.log2(bound)) if bound > 0 else 1.0


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

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                  "micro-batch-token-mean")


def agg_units(mask: Tensor, mode: str = "token-mean") -> Tensor:
    """What ``agg_loss`` averages over, float32 scalar: real tokens for token-mean, rows with at
    least one real token for the seq-* modes.

    mask: [B, T]. Rows whose mask is all 0 (groups dropped by filter_zero_std_groups) are no
    sequences of the batch, so no mode counts them. Summed over micro-batches and processes this
    is the global normaliser: micro-batch loss * its units / global units adds up to the loss of
    the whole batch (RL_NOTES 14). micro-batch-token-mean (TRL's bnpo) counts the micro-batch
    itself as one unit (1 if it holds a real token): the minibatch loss is then the mean over
    micro-batches of each one's token mean, so the caller sums units per micro-batch.
    """
    mask = mask.float()
    if mode == "token-mean":
        return mask.sum()
    if mode == "micro-batch-token-mean":
        return (mask.sum() > 0).float()
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
    micro-batch-token-mean   = sum(loss * mask) / sum(mask) of this micro-batch (TRL's bnpo: the
                             update averages the micro-batches' token means, see agg_units)
    """
    mask = mask.float()
    if mode in ("token-mean", "micro-batch-token-mean"):
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
