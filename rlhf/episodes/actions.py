"""Episode tensors seen as the model's actions only: the sampled tokens, with the tool/glue tokens
between turns taken out (they are part of the environment's transition, not actions).

Estimators that walk along the sequence (GAE, discounted reward-to-go) must not treat a tool
token as a step: V at the last token of a turn bootstraps from V at the first sampled token of
the next turn, and gamma/lambda discount once per action, not once per tool token. Running any
registered estimator on ``compact_actions(...)`` and putting the result back with
``expand_actions`` does exactly that, without changing the estimator.

Imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def action_order(mask: Tensor) -> Tensor:
    """[B, T] long: in each row, the positions where mask is 1 in order, then the others in order
    (a permutation of 0..T-1 per row). mask: [B, T] (1 = sampled token)."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    return ((1 - (mask > 0).long()) * length + positions).argsort(dim=1)


def compact_actions(tensor: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's values at its sampled tokens, moved to the left.

    tensor, mask: [B, T] -> (compact [B, A], compact_mask [B, A] float) with A = the most sampled
    tokens in a row (at least 1); compact is 0 where compact_mask is 0.
    """
    width = max(int((mask > 0).sum(1).max()), 1) if mask.numel() else 1
    order = action_order(mask)[:, :width]
    counts = (mask > 0).sum(1, keepdim=True)
    compact_mask = (torch.arange(width, device=mask.device).unsqueeze(0) < counts).to(torch.float32)
    return tensor.gather(1, order) * compact_mask.to(tensor.dtype), compact_mask


def expand_actions(compact: Tensor, mask: Tensor) -> Tensor:
    """The inverse of compact_actions: compact [B, A] back to the sampled positions of mask [B, T];
    0 on every other token."""
    width = compact.shape[1]
    order = action_order(mask)[:, :width]
    counts = (mask > 0).sum(1, keepdim=True)
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts
    out = torch.zeros(mask.shape, dtype=compact.dtype, device=compact.device)
    # a row's positions are distinct (a permutation), so no two values land on one token
    return out.scatter(1, order, torch.where(valid, compact, torch.zeros_like(compact)))
