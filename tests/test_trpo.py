"""TRPO's trust region on a tiny model: every accepted step keeps the measured KL <= max_kl and
improves the surrogate; a step that cannot improve leaves the weights untouched."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from rlhf.models import PolicyWithValue, add_lora, load_base_model, load_tokenizer
from rlhf.rollout import forward_response, generate_rollout
from rlhf.algorithms.trpo import categorical_kl, trpo_step, trpo_surrogate_loss

TEMPERATURE = 0.9


@pytest.fixture()
def setup(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"])
    # LoRA B starts at zero, where A gets no gradient; random B makes every parameter matter.
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model = PolicyWithValue(policy, None)
    prompts = ["Tell me about the sea.", "Hi!", "Write one line about cats, please.", "Why?", "Name a colour.", "Go"]
    rollout = generate_rollout(policy, tokenizer, prompts, prompts=prompts, group_ids=list(range(6)), columns={},
                               max_prompt_length=32, max_new_tokens=6, temperature=TEMPERATURE, top_p=1.0)
    with torch.no_grad():
        old_logprobs = forward_response(model, rollout, slice(None), TEMPERATURE)[0]
    advantages = torch.randn(old_logprobs.shape) * rollout.mask
    return model, rollout, old_logprobs, advantages


def full_logprobs(model, rollout, rows):
    logits, _, _ = model(input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows],
                      position_ids=rollout.position_ids[rows], response_length=rollout.response_length)
    return torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)


def measure(model, rollout, old_logprobs, advantages, old_probs=None):
    """Independent of rlhf.trpo: surrogate -mean(ratio*A) and mean token KL(old || new)."""
    with torch.no_grad():
        logp = full_logprobs(model, rollout, slice(None))
        taken = logp.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
        mask = rollout.mask.float()
        surrogate = -((taken - old_logprobs).exp() * advantages * mask).sum() / mask.sum()
        kl = None
        if old_probs is not None:
            per_token = (old_probs * (old_probs.clamp_min(1e-30).log() - logp)).sum(-1)
            kl = float((per_token * mask).sum() / mask.sum())
    return float(surrogate), kl, logp.exp()


def run_step(model, rollout, old_logprobs, advantages, max_kl, micro=3, **kwargs):
    params = [p for p in model.policy.parameters() if p.requires_grad]
    micro_batches = list(torch.arange(len(rollout)).split(micro))
    return trpo_step(params, lambda rows: full_logprobs(model, rollout, rows), micro_batches, rollout.response_ids,
                     old_logprobs, advantages, rollout.mask, max_kl=max_kl, **kwargs)


def test_categorical_kl_and_surrogate_formulas():
    old = torch.log_softmax(torch.tensor([[[1.0, 0.0, -1.0]]]), -1)
    new = torch.log_softmax(torch.tensor([[[0.0, 0.5, 0.0]]]), -1)
    p, q = old.exp()[0, 0], new.exp()[0, 0]
    assert categorical_kl(old, new).item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-6)
    assert categorical_kl(old, old).item() == pytest.approx(0.0, abs=1e-7)
    lp, old_lp = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -1.0]])
    adv, mask = torch.tensor([[2.0, -1.0]]), torch.ones(1, 2)
    expected = -(2.0 * torch.exp(torch.tensor(0.5)) + -1.0 * 1.0) / 2
    assert trpo_surrogate_loss(lp, old_lp, adv, mask).item() == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("max_kl", [1e-4, 1e-3, 1e-2])
def test_every_accepted_step_respects_the_trust_region_and_improves(setup, max_kl):
    model, rollout, old_logprobs, advantages = setup
    accepted_steps = 0
    for _ in range(3):  # successive steps from the moved policy (old = the rollout's policy)
        before, _, old_probs = measure(model, rollout, old_logprobs, advantages)
        stats = run_step(model, rollout, old_logprobs, advantages, max_kl)
        after, kl, _ = measure(model, rollout, old_logprobs, advantages, old_probs)
        if stats["trpo/accepted"]:
            accepted_steps += 1
            assert kl <= max_kl * (1 + 1e-4), (kl, max_kl)
            assert after < before
            # KL ~1e-5 from float32 logprobs summed in another micro-batch order: ~0.2% rounding seen
            assert stats["trpo/kl_after_step"] == pytest.approx(kl, rel=1e-2, abs=1e-9)
            assert stats["trpo/actual_improve"] == pytest.approx(before - after, rel=1e-3, abs=1e-9)
        else:
            assert after == pytest.approx(before, abs=1e-7) and kl == pytest.approx(0.0, abs=1e-7)
    assert accepted_steps >= 1


def test_step_uses_most_of_the_trust_region(setup):
    # The quadratic model should be roughly right: the accepted KL is a sizeable share of max_kl.
    model, rollout, old_logprobs, advantages = setup
    stats = run_step(model, rollout, old_logprobs, advantages, max_kl=1e-3, cg_damping=1e-3, cg_iters=20)
    assert stats["trpo/accepted"] == 1.0
    assert 0.05 * 1e-3 < stats["trpo/kl_after_step"] <= 1e-3


def test_micro_batching_does_not_change_the_step(setup):
    model, rollout, old_logprobs, advantages = setup
    start = parameters_to_vector([p for p in model.policy.parameters() if p.requires_grad]).detach().clone()
    run_step(model, rollout, old_logprobs, advantages, max_kl=1e-3, micro=6)
    whole = parameters_to_vector([p for p in model.policy.parameters() if p.requires_grad]).detach().clone()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(start, [p for p in model.policy.parameters() if p.requires_grad])
    run_step(model, rollout, old_logprobs, advantages, max_kl=1e-3, micro=2)
    split = parameters_to_vector([p for p in model.policy.parameters() if p.requires_grad]).detach()
    assert torch.allclose(whole, split, atol=1e-5, rtol=1e-4)
    assert not torch.equal(whole, start)


def test_no_improving_direction_leaves_weights_unchanged(setup):
    model, rollout, old_logprobs, advantages = setup
    params = [p for p in model.policy.parameters() if p.requires_grad]
    start = parameters_to_vector(params).detach().clone()
    stats = run_step(model, rollout, old_logprobs, torch.zeros_like(advantages), max_kl=1e-2)
    assert stats["trpo/accepted"] == 0.0
    assert torch.equal(parameters_to_vector(params).detach(), start)


def test_fisher_subsample_still_respects_the_trust_region(setup):
    model, rollout, old_logprobs, advantages = setup
    before, _, old_probs = measure(model, rollout, old_logprobs, advantages)
    stats = run_step(model, rollout, old_logprobs, advantages, max_kl=1e-3, fisher_rows=torch.tensor([0, 3]))
    after, kl, _ = measure(model, rollout, old_logprobs, advantages, old_probs)
    assert stats["trpo/accepted"] == 1.0
    assert kl <= 1e-3 * (1 + 1e-4) and after < before
