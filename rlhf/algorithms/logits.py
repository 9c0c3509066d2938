"""Logprobs and entropy of sampled tokens from logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rlhf.cpu_linear import times_transposed, times_weight


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position, float32 [B, T].

    logits: [B, T, V].  H = -sum_v p_v log p_v with log p = log_softmax(z), which is stable for
    large logits (log_softmax subtracts the max inside its fused kernel).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels] per position, float32 [B, T].

    logits: [B, T, V]; labels: [B, T] long.  lp = log_softmax(z)[label].
    One fused log_softmax (its backward is softmax minus one-hot, also fused) is about 1.6x faster
    on a CPU than z[label] - logsumexp(z) with its separate reductions. Lower-precision logits are
    upcast one row at a time so the float32 copy stays one row's size.
    """
    labels = labels.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        return torch.log_softmax(logits, dim=-1).gather(-1, labels).squeeze(-1).float()
    rows = [torch.log_softmax(row.float(), dim=-1).gather(-1, row_labels).squeeze(-1)
            for row, row_labels in zip(logits, labels)]
    return torch.stack(rows)


def logprobs_and_entropy_from_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(logprobs_from_logits, entropy_from_logits) from one log_softmax, float32 [B, T] each.

    logits: [B, T, V]; labels: [B, T].  log p = log_softmax(z); lp = log p[label];
    H = -sum_v exp(log p_v) log p_v.  The entropy is a metric and carries no gradient.
    """
    if logits.dtype not in (torch.float32, torch.float64):  # upcast one row at a time, one log_softmax each
        rows = [logprobs_and_entropy_from_logits(row.float().unsqueeze(0), row_labels.unsqueeze(0))
                for row, row_labels in zip(logits, labels)]
        return torch.cat([lp for lp, _ in rows]), torch.cat([h for _, h in rows])
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).float()
    with torch.no_grad():  # row by row: the temporaries stay one row's size instead of two more [B, T, V]
        entropy = torch.stack([-(row.exp() * row).sum(-1) for row in log_probs.detach()]).float()
    return logprobs, entropy


# Float32 logits per chunk at most: 2**24 floats = 64 MiB (341 rows of a 49k vocabulary). Half the
# 128 MiB chunk this had: 4096 tokens of SmolLM2's head forward and backward take 3.16 instead of
# 3.33 s (5 alternating runs, AVX-512 EPYC), the same numbers (``row_chunks``); 170 rows were slower.
CHUNK_LOGITS = 2 ** 24


def row_chunks(rows: int, vocabulary: int) -> list[slice]:
    """``rows`` rows of logits over ``vocabulary`` as chunks of at most CHUNK_LOGITS floats (at
    least 3 rows), spread evenly: a one-row product takes another kernel than products of 2+ rows
    and rounds differently, and an even split leaves no chunk with a single row (where there is
    more than one row), so every row's numbers are those of the whole batch's product."""
    most = max(3, CHUNK_LOGITS // vocabulary)
    chunks = -(-rows // most)
    bounds = [rows * index // chunks for index in range(chunks + 1)] if chunks else []
    return [slice(start, end) for start, end in zip(bounds, bounds[1:])]


class _ChunkedProjectionLogprobs(torch.autograd.Function):
    """lp = log_softmax(h W^T / tau)[label] without ever holding the [N, V] logits.

    The plain path keeps three [N, V] float32 tensors alive around the backward (log_softmax's
    saved output, the gather's gradient, log_softmax's input gradient): 2.4 GB for 16 responses
    of 256 tokens with a 49k vocabulary. Here the projection runs over row chunks, and since the
    gradient of a token's logprob with respect to its own hidden state does not depend on the loss,
      d lp / d h = (W[label] - p W) / tau        (p = softmax(h W^T / tau)),
    the forward computes that [N, H] direction while each chunk's probabilities are at hand and the
    backward scales it by each token's incoming gradient: two products with the LM head per token
    (h W^T, p W), where recomputing the logits in the backward took three (16 x 256 tokens of
    SmolLM2: 7.4 -> 4.9 s). W gets no gradient (the LM head is frozen under LoRA).

    With ``entropy_gradient`` (an entropy bonus in the loss) the entropy keeps its gradient the same
    way: dH/dz = -p (log p + H), so dH/dh = -(p (log p + H)) W / tau, one more LM-head product per
    token, formed while the chunk's probabilities are at hand.

    ``kept_logits`` (a buffer [n, V] and an index [N] into it): h W^T as computed already for these
    rows (the sampler's, ``rlhf.sampled_products``), copied out a chunk at a time instead of
    projecting again; the backward's direction still comes from them and W, as above.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float,
                with_entropy: bool, entropy_gradient: bool = False,
                kept_logits: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(hidden.shape[0] if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        direction = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        entropy_direction = torch.empty_like(hidden) if entropy_gradient and direction is not None else None
        for chunk in row_chunks(hidden.shape[0], weight.shape[0]):
            logits = (times_transposed(hidden[chunk], weight) if kept_logits is None
                      else kept_logits[0].index_select(0, kept_logits[1][chunk]))
            log_probs = _chunk_log_softmax(logits, temperature)
            del logits
            logprobs[chunk] = log_probs.gather(-1, labels[chunk].unsqueeze(-1)).squeeze(-1)
            probs = log_probs.exp() if with_entropy or direction is not None else None
            if with_entropy:
                entropy[chunk] = -(probs * log_probs).sum(-1)
            if direction is not None:
                expected = times_weight(probs.to(weight.dtype), weight)  # p W
                toward_label = weight[labels[chunk]] - expected
                direction[chunk] = _per_temperature(toward_label, temperature).to(hidden.dtype)
            if entropy_direction is not None:  # -(p (log p + H)) W
                spread = probs * (log_probs + entropy[chunk].unsqueeze(-1))
                away = times_weight(spread.to(weight.dtype), weight)
                entropy_direction[chunk] = _per_temperature(-away, temperature).to(hidden.dtype)
                del spread
            del log_probs, probs  # before the next chunk's logits: one chunk's [rows, V] tensors alive at a time
        ctx.save_for_backward(direction, entropy_direction)
        if entropy_direction is None:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @once_differentiable  # TRPO's second derivatives take the plain path (full log-softmax)
    def backward(ctx: Any, grad_logprobs: Tensor, grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        direction, entropy_direction = ctx.saved_tensors
        grad = grad_logprobs.to(direction.dtype).unsqueeze(-1) * direction
        if entropy_direction is not None and grad_entropy is not None:
            grad = grad + grad_entropy.to(direction.dtype).unsqueeze(-1) * entropy_direction
        return grad, None, None, None, None, None, None


def _per_temperature(direction: Tensor, temperature: float) -> Tensor:
    """A gradient with respect to logits / temperature, as one with respect to the logits."""
    return direction / temperature if temperature != 1.0 else direction


def _chunk_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def logprobs_from_hidden(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         with_entropy: bool = False, entropy_gradient: bool = False,
                         kept_logits: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """(logprobs, entropy | None) of ``labels`` under logits = hidden @ weight^T / temperature,
    float32 [B, T] each, computed in row chunks so the [B, T, V] logits never exist at once.

    hidden: [B, T, H] (final hidden states at the positions that predict the labels); weight:
    [V, H] the LM head (no gradient reaches it); labels: [B, T] long. Equal to
    ``logprobs_and_entropy_from_logits(hidden @ weight.T / temperature, labels)`` up to float
    rounding of the chunked matmul; gradients flow to ``hidden``, and the entropy's too with
    ``entropy_gradient`` (which implies ``with_entropy``; otherwise the entropy carries none).
    ``kept_logits``: (buffer [n, V], index [B * T]) with ``buffer[index]`` the logits
    ``hidden @ weight^T`` already computed (up to float rounding) for the B x T positions in
    row-major order: taken instead of the projection (``rlhf.sampled_products``).
    """
    batch, length, size = hidden.shape
    with_entropy = with_entropy or entropy_gradient
    logprobs, entropy = _ChunkedProjectionLogprobs.apply(hidden.reshape(-1, size), weight, labels.reshape(-1).long(),
                                                         float(temperature), with_entropy, entropy_gradient,
                                                         kept_logits)
    return logprobs.view(batch, length), entropy.view(batch, length) if with_entropy else None
