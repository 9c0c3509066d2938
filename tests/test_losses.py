"""GSPO, GSPO-token and CISPO (rlhf.algorithms.losses) against hand-computed numbers and gradients."""

import math

import pytest
import torch

from rlhf import algorithms as A

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)


def grads_of(loss_name, logprobs, old, advantages, mask=MASK, **kwargs):
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = A.POLICY_LOSSES[loss_name](lp, old, advantages, mask, **kwargs)
    loss.backward()
    return loss, lp.grad, stats


def test_gspo_uses_one_length_normalised_ratio_per_response():
    old = torch.full((2, 4), -1.0)
    logprobs = old + torch.tensor([[0.3, -0.1, 0.1, 9.0], [0.2, 0.0, 5.0, 5.0]])  # padding differs wildly
    adv = torch.tensor([[1.0] * 4, [-2.0] * 4])
    loss, grad, stats = grads_of("gspo", logprobs, old, adv, clip_range=0.5, clip_range_high=0.5,
                                 loss_agg_mode="seq-mean-token-mean")
    s = [math.exp((0.3 - 0.1 + 0.1) / 3), math.exp(0.2 / 2)]  # exp(mean log-ratio over real tokens)
    assert float(loss.detach()) == pytest.approx(-(1.0 * s[0] + -2.0 * s[1]) / 2, abs=1e-6)
    # d/d lp_t of -A s_i / 2 (seq mean over 2 rows) = -A s_i / (2 |y_i|): the same for every token of a row
    assert torch.allclose(grad[0, :3], torch.full((3,), -1.0 * s[0] / 6), atol=1e-6)
    assert torch.allclose(grad[1, :2], torch.full((2,), 2.0 * s[1] / 4), atol=1e-6)
    assert float(grad[MASK == 0].abs().max()) == 0.0
    assert stats["clip_frac"] == 0.0


def test_gspo_clips_whole_responses():
    old = torch.full((2, 4), -1.0)
    logprobs = old + torch.tensor([[0.03, 0.03, 0.03, 0.0], [0.0001, 0.0, 0.0, 0.0]])  # row 0: s = e^0.03 > 1 + 4e-4
    adv = torch.ones(2, 4)
    _, grad, stats = grads_of("gspo", logprobs, old, adv)  # the paper's band 3e-4 / 4e-4
    assert float(grad[0].abs().max()) == 0.0  # clipped: no token of the response learns
    assert float(grad[1, :2].abs().min()) > 0.0
    assert stats["clip_frac"] == pytest.approx(0.5)


def test_gspo_token_equals_gspo_for_row_constant_advantages_and_follows_per_token_ones():
    torch.manual_seed(0)
    old = -torch.rand(2, 4) - 0.5
    logprobs = old + 0.01 * torch.randn(2, 4)
    constant = torch.tensor([[0.7] * 4, [-1.3] * 4])
    kwargs = dict(clip_range=0.2, clip_range_high=0.2)
    loss_seq, grad_seq, _ = grads_of("gspo", logprobs, old, constant, **kwargs)
    loss_tok, grad_tok, _ = grads_of("gspo_token", logprobs, old, constant, **kwargs)
    assert float(loss_seq) == pytest.approx(float(loss_tok), abs=1e-7)
    assert torch.allclose(grad_seq, grad_tok, atol=1e-7)
    per_token = torch.tensor([[1.0, 0.0, -1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    _, grad, _ = grads_of("gspo_token", logprobs, old, per_token, loss_agg_mode="token-mean", **kwargs)
    s = torch.exp(((logprobs - old) * MASK).sum(-1) / MASK.sum(-1))
    # token-mean over 5 real tokens: d/d lp_t = -s_i A_t / 5
    expected = -(s.unsqueeze(1) * per_token) / 5 * MASK
    assert torch.allclose(grad, expected, atol=1e-6)


def test_cispo_keeps_every_token_in_the_gradient_with_a_capped_detached_weight():
    old = torch.full((2, 4), -2.0)
    log_ratio = torch.tensor([[0.0, 1.0, -0.5, 0.0], [math.log(5.0) + 1.0, 0.1, 0.0, 0.0]])
    logprobs = old + log_ratio
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0], [1.0, -2.0, 0.0, 0.0]])
    loss, grad, stats = grads_of("cispo", logprobs, old, adv)  # epsilon_high 5.0 caps the weight at 5
    weight = torch.exp(log_ratio).clamp(max=5.0)
    assert torch.allclose(grad, -(weight * adv) / 5 * MASK, atol=1e-6)  # token-mean over 5 tokens
    assert float(loss) == pytest.approx(float(-(weight * adv * logprobs * MASK).sum() / 5), abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 5)  # only the e^(log 5 + 1) token hit the cap
    # PPO's clip drops the tokens whose ratio left the band (here e^1 with A > 0); CISPO keeps them.
    _, ppo_grad, _ = grads_of("ppo_clip", logprobs, old, adv, clip_range=0.2)
    assert float(ppo_grad[0, 1]) == 0.0 and float(grad[0, 1]) != 0.0


def test_cispo_lower_bound_and_bad_caps():
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[-3.0, 0.0]])  # ratio e^-3 on the first token
    _, grad, _ = grads_of("cispo", logprobs, old, torch.ones(1, 2), mask=torch.ones(1, 2), epsilon_low=0.5)
    assert float(grad[0, 0]) == pytest.approx(-0.5 / 2)  # weight raised to 1 - 0.5
    with pytest.raises(ValueError, match="epsilon_high"):
        A.POLICY_LOSSES["cispo"](logprobs, old, torch.ones(1, 2), torch.ones(1, 2), epsilon_high=0.0)
    # TRL accepts a cap at or below 1 (its default for cispo is epsilon, 0.2): every weight is then ~the cap
    loss, stats = A.POLICY_LOSSES["cispo"](logprobs, old, torch.ones(1, 2), torch.ones(1, 2), epsilon_high=0.2)
    assert stats["clip_frac"] == pytest.approx(0.5)  # the ratio-1 token is capped at 0.2, the e^-3 one is not
