"""Speed-ups must not change what is trained."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from rlhf.cli import ALGORITHM_DEFAULTS
from rlhf.config import RLConfig
from rlhf.trainer import RLTrainer


class AlwaysRecomputeOldLogprobs(RLTrainer):
    def __init__(self, config):
        super().__init__(config)
        self.passes = dataclasses.replace(self.passes, old=True)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_skipping_the_old_logprob_pass_gives_the_same_update(tiny_model_dir, tmp_path, kl_coef):
    """GRPO, one epoch, one minibatch: the old logprobs taken from the update's forward equal the
    no-grad pass's, so weights and logged metrics agree with the slow path."""
    runs = {}
    for name, cls in (("fast", RLTrainer), ("slow", AlwaysRecomputeOldLogprobs)):
        config = RLConfig(**{
            **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir),
            "output_dir": str(tmp_path / name), "max_steps": 2, "rollout_batch_size": 2, "num_generations": 2,
            "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6, "max_prompt_length": 48, "lora_r": 4,
            "lora_alpha": 8, "learning_rate": 1e-3, "kl_coef": kl_coef, "save_steps": 0, "num_samples_to_log": 0,
            "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"],
        })
        trainer = cls(config)
        assert trainer.old_logprobs_from_update is (name == "fast")
        trainer.train()
        runs[name] = tmp_path / name
    fast, slow = (load_file(str(runs[n] / "final" / "adapter_model.safetensors")) for n in ("fast", "slow"))
    assert max(float((fast[k] - slow[k]).abs().max()) for k in fast) < 1e-6
    rows = {n: [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in runs}
    for fast_row, slow_row in zip(rows["fast"], rows["slow"]):
        for key in ("reward_mean", "entropy", "policy_loss", "adv_mean"):
            assert fast_row[key] == pytest.approx(slow_row[key], abs=1e-5), key
        if kl_coef:
            assert fast_row["kl"] == pytest.approx(slow_row["kl"], abs=1e-5)


def test_old_logprob_pass_is_kept_where_it_is_needed():
    from rlhf.algorithms import ADVANTAGE_ESTIMATORS
    from rlhf.experience import plan_passes
    from rlhf.update import UPDATERS

    def from_update(**overrides):
        config = RLConfig(**{**ALGORITHM_DEFAULTS["grpo"], "rollout_batch_size": 4, "num_generations": 4,
                             "mini_batch_size": 16, "ppo_epochs": 1, **overrides})
        passes = plan_passes(config, ADVANTAGE_ESTIMATORS[config.advantage_estimator], UPDATERS[config.update_method])
        return not passes.old

    assert from_update()
    assert not from_update(ppo_epochs=2)  # later epochs see a moved policy
    assert not from_update(mini_batch_size=8)  # so do later minibatches
    assert not from_update(kl_in_reward=True)  # KL in the reward needs them first
    assert not from_update(advantage_estimator="gae")  # values feed GAE (registry: values=True)
    assert not from_update(update_method="trpo")  # TRPO's entry asks for them (old_logprobs=True)
    assert from_update(kl_in_reward=True, kl_coef=0.0)  # no reference, no KL in the reward


def _trained_lora(model_dir, dtype=None):
    import torch

    from rlhf.models import add_lora, load_base_model

    torch.manual_seed(0)
    policy = add_lora(load_base_model(str(model_dir)), 4, 8, 0.0, ["all-linear"])
    with torch.no_grad():  # a non-zero adapter, as after some training
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    if dtype is not None:
        for name, param in policy.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(dtype)
    return policy.eval()


def test_merged_lora_weights_sample_the_same_distribution_and_restore_the_base_bitwise(tiny_model_dir):
    import torch

    from rlhf.models import merged_lora_weights

    policy = _trained_lora(tiny_model_dir)
    input_ids = torch.randint(0, 1000, (3, 12))
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        unmerged = policy(input_ids=input_ids).logits
        with policy.disable_adapter():
            reference = policy(input_ids=input_ids).logits
        with merged_lora_weights(policy) as merged_policy:
            merged = merged_policy(input_ids=input_ids).logits
            assert sum(m.disable_adapters for m in policy.modules() if hasattr(m, "lora_A")) > 0  # LoRA path off
        after = policy(input_ids=input_ids).logits
    assert (unmerged - reference).abs().max() > 1e-2  # the adapter matters ...
    assert torch.allclose(merged, unmerged, atol=1e-5)  # ... and merging keeps it
    assert torch.equal(after, unmerged)
    for name, param in policy.named_parameters():
        assert torch.equal(param, base_before[name]), name  # nothing drifted, base and adapter
    assert all(not m.disable_adapters for m in policy.modules() if hasattr(m, "lora_A"))


def test_merged_lora_weights_inside_disabled_adapters_sample_the_base_and_keep_them_off(tiny_model_dir):
    """A caller sampling the base (adapters switched off, as evaluation's base row does) must get
    the base, and the adapters stay off (before the fix it folded in the active adapter whether
    or not it was disabled: logits off by 0.64)."""
    import torch

    from rlhf.models import merged_lora_weights

    policy = _trained_lora(tiny_model_dir)
    input_ids = torch.randint(0, 1000, (3, 12))
    with torch.no_grad(), policy.disable_adapter():
        reference = policy(input_ids=input_ids).logits
        with merged_lora_weights(policy) as sampler:
            sampled = sampler(input_ids=input_ids).logits
        after = policy(input_ids=input_ids).logits
        assert all(m.disable_adapters for m in policy.modules() if hasattr(m, "lora_A"))
    assert torch.equal(sampled, reference)
    assert torch.equal(after, reference)


def test_merged_lora_weights_leave_a_policy_merged_already_as_it_was(tiny_model_dir):
    """A caller's policy after peft's ``merge_adapter``: sampling draws from it and leaves it merged
    (before the fix the LoRA was folded in a second time, peft unmerged it from that copy when the
    layers were switched off, and the merged weights came back under layers marked unmerged: every
    later forward added the LoRA twice, logits off by about 1 on SmolLM2's shape)."""
    import torch

    from rlhf.models import merged_lora_weights
    from rlhf.sampling_forward import sampling_forward

    policy = _trained_lora(tiny_model_dir)
    input_ids = torch.randint(0, 1000, (3, 12))
    with torch.no_grad():
        unmerged = policy(input_ids=input_ids).logits
        policy.merge_adapter()
        merged = policy(input_ids=input_ids).logits
        weights = {n: p.detach().clone() for n, p in policy.named_parameters()}
        with merged_lora_weights(policy) as sampler:
            sampled = sampler(input_ids=input_ids).logits
            fast = sampling_forward(sampler)
            assert fast is not None
            fast_logits = fast(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               position_ids=torch.arange(12).expand(3, -1)).logits
        after = policy(input_ids=input_ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.equal(sampled, merged) and torch.equal(fast_logits, merged)
    assert torch.equal(after, merged)
    assert all(m.merged for m in policy.modules() if hasattr(m, "lora_A"))
    for name, param in policy.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_merged_lora_weights_switch_adapters_off_as_peft_does_and_leave_frozen_weights_frozen(tiny_model_dir):
    """Sampling switches the LoRA layers off by peft's own flags (what ``disable_adapter`` sets),
    without its requires_grad round trip: a LoRA weight its owner froze (LoRA-FA freezes A) stays
    frozen after a rollout (peft's exit re-enables every active adapter weight: before, the tiny
    model's frozen A matrices came out of sampling trainable), and the trainable ones stay so, also
    where peft's ``disable_adapter`` ran inside (it would leave them all frozen)."""
    import torch

    from rlhf.models import merged_lora_weights

    policy = _trained_lora(tiny_model_dir)
    lora_layers = [m for m in policy.modules() if hasattr(m, "lora_A")]
    with policy.disable_adapter():  # (whose exit makes every active adapter weight trainable)
        reference_flags = [m.disable_adapters for m in lora_layers], policy._adapters_disabled
    for name, param in policy.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    trainable = {name: param.requires_grad for name, param in policy.named_parameters()}
    assert any(trainable.values()) and not all(trainable.values())
    input_ids = torch.randint(0, 1000, (3, 12))
    with torch.no_grad():
        with merged_lora_weights(policy) as sampler:
            flags = [m.disable_adapters for m in lora_layers], policy._adapters_disabled
            sampler(input_ids=input_ids)
    assert flags == reference_flags and all(flags[0]) and flags[1]
    assert {name: param.requires_grad for name, param in policy.named_parameters()} == trainable
    assert not any(m.disable_adapters for m in lora_layers) and not policy._adapters_disabled
    # peft's own switch used inside (a user's reward or tool code): it sees the adapters off and
    # freezes them on its way out; the sampling's exit puts every weight back as it was
    with torch.no_grad(), merged_lora_weights(policy) as sampler:
        with policy.disable_adapter():
            sampler(input_ids=input_ids)
    assert {name: param.requires_grad for name, param in policy.named_parameters()} == trainable
    assert not any(m.disable_adapters for m in lora_layers) and not policy._adapters_disabled


def test_adapters_off_is_peft_disable_adapter_for_the_reference_pass(tiny_model_dir):
    """The reference pass (KL) and evaluation's base row switch the adapters off through
    ``adapters_off``: the base model's logits, as ``disable_adapter`` gives them, with peft's flags
    set inside and everything as it was after, frozen adapter weights included; a model with
    ``modules_to_save`` (which only peft's switch turns off) takes peft's switch."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlhf.models import adapters_off, load_base_model

    input_ids = torch.randint(0, 1000, (3, 12))
    policy = _trained_lora(tiny_model_dir)
    for name, param in policy.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    trainable = {name: param.requires_grad for name, param in policy.named_parameters()}
    with torch.no_grad():
        adapted = policy(input_ids=input_ids).logits
        with adapters_off(policy) as base:
            ours = base(input_ids=input_ids).logits
            assert policy._adapters_disabled and all(m.disable_adapters for m in policy.modules() if hasattr(m, "lora_A"))
        assert torch.equal(policy(input_ids=input_ids).logits, adapted)
        assert {name: param.requires_grad for name, param in policy.named_parameters()} == trainable
        with policy.disable_adapter():
            peft_base = policy(input_ids=input_ids).logits
    assert torch.equal(ours, peft_base) and not torch.equal(ours, adapted)

    torch.manual_seed(0)
    with_saved = get_peft_model(load_base_model(str(tiny_model_dir)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])).eval()
    # peft's own switch turns every active adapter weight trainable on exit; the user's frozen A
    # stays frozen through ours (before: all 4 of them came back trainable, helper-51)
    for name, param in with_saved.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    trainable = {name: param.requires_grad for name, param in with_saved.named_parameters()}
    with torch.no_grad():
        with_saved.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
        with adapters_off(with_saved):
            got = with_saved(input_ids=input_ids).logits
        assert {name: param.requires_grad for name, param in with_saved.named_parameters()} == trainable
        with with_saved.disable_adapter():
            expected = with_saved(input_ids=input_ids).logits
    assert torch.equal(got, expected)


def test_merged_lora_weights_leave_bfloat16_bases_unmerged(tiny_model_dir):
    import torch

    from rlhf.models import merged_lora_weights

    policy = _trained_lora(tiny_model_dir, dtype=torch.bfloat16)
    weights = [m.get_base_layer().weight for m in policy.modules() if hasattr(m, "lora_A")]
    with merged_lora_weights(policy) as same:
        assert same is policy
        assert all(m.get_base_layer().weight is w for m, w in zip(
            [m for m in policy.modules() if hasattr(m, "lora_A")], weights))
        assert all(not m.disable_adapters for m in policy.modules() if hasattr(m, "lora_A"))


def _grouped_rollout(model_dir, share_prompt_prefix):
    import torch

    from rlhf.models import PolicyWithValue, ValueHead, load_tokenizer
    from rlhf.rollout import generate_rollout

    policy = _trained_lora(model_dir)
    model = PolicyWithValue(policy, ValueHead(policy.config.hidden_size), share_prompt_prefix=share_prompt_prefix)
    with torch.no_grad():
        model.value_head.summary.weight.normal_()
    tokenizer = load_tokenizer(str(model_dir))
    prompts = ["Hi", "Hi", "A much longer prompt with more tokens", "Hi", "A much longer prompt with more tokens",
               "Something else"]
    torch.manual_seed(1)
    rollout = generate_rollout(policy, tokenizer, prompts, prompts=prompts, group_ids=[0, 0, 1, 0, 1, 2], columns={},
                               max_prompt_length=32, max_new_tokens=7, temperature=1.0, top_p=1.0,
                               share_prompt_prefix=share_prompt_prefix)
    return model, rollout


def test_shared_prompt_prefix_gives_the_same_samples_logprobs_values_and_gradients(tiny_model_dir):
    """Rows with the same prompt run it once (KV cache copied per row), in generation and in the
    forward with grad; everything downstream matches the plain computation."""
    import torch

    from rlhf.rollout import forward_response

    results = {}
    for shared in (False, True):
        model, rollout = _grouped_rollout(tiny_model_dir, shared)
        logprobs, values, entropy = forward_response(model, rollout, slice(None), 0.7, with_entropy=True)
        ((logprobs * rollout.mask).sum() + (values * rollout.mask).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[shared] = rollout, logprobs.detach(), values.detach(), entropy, grads
    (plain_rollout, *plain), (shared_rollout, *shared) = results[False], results[True]
    assert torch.equal(plain_rollout.input_ids, shared_rollout.input_ids)  # same RNG, same logits -> same tokens
    for a, b in zip(plain[:3], shared[:3]):
        assert torch.allclose(a, b, atol=1e-5)
    plain_grads, shared_grads = plain[3], shared[3]
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 10
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], shared_grads[name], atol=1e-5, rtol=1e-4), name
    # the prompt layers' LoRA weights get gradient only through the copied cache: it must flow
    assert any(float(g.abs().max()) > 0 for n, g in shared_grads.items() if "layers.0." in n and "lora_A" in n)


def test_shared_prompt_prefix_runs_each_distinct_prompt_once(tiny_model_dir):
    import torch

    from rlhf.models import distinct_prompts

    model, rollout = _grouped_rollout(tiny_model_dir, True)
    prompt_length = rollout.input_ids.shape[1] - rollout.response_length
    representatives, inverse = distinct_prompts(rollout.input_ids[:, :prompt_length],
                                                rollout.attention_mask[:, :prompt_length])
    assert sorted(representatives.tolist()) == [0, 2, 5]
    assert inverse[[0, 1, 3]].unique().numel() == 1 and inverse[2] == inverse[4] and inverse[5] != inverse[0]
    assert distinct_prompts(torch.tensor([[1, 2], [1, 3]]), torch.ones(2, 2)) is None
    seen = []
    model._decoder_without_head()  # the projection probe's own forward, before counting
    decoder = model.policy.get_base_model().get_decoder()  # the prefix runs the decoder alone
    handle = decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
    from rlhf.rollout import forward_response

    with torch.no_grad():
        forward_response(model, rollout, slice(None), 1.0)
    handle.remove()
    # the last prompt token and every response token but the last (whose outputs predict nothing)
    assert seen == [(3, prompt_length - 1), (6, rollout.response_length)]


def test_the_forward_feeds_no_token_after_the_last_predicting_position(tiny_model_dir):
    """The last response token's outputs would predict a token past the response: it is not fed
    (with or without a shared prompt), and the logprobs are those of the full sequence's logits."""
    import torch

    from rlhf.algorithms import logprobs_from_logits
    from rlhf.rollout import forward_response

    model, rollout = _grouped_rollout(tiny_model_dir, False)
    seen = []
    handle = model.policy.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                                    with_kwargs=True)
    with torch.no_grad():
        logprobs, _, _ = forward_response(model, rollout, slice(None), 1.0)
    handle.remove()
    assert seen == [(6, rollout.input_ids.shape[1] - 1)]
    with torch.no_grad():
        logits = model.policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                              position_ids=rollout.position_ids).logits
    length = rollout.response_length
    expected = logprobs_from_logits(logits[:, -length - 1:-1], rollout.response_ids)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_fused_lora_layers_give_peft_outputs_and_gradients(tiny_model_dir):
    import torch

    from rlhf.models import fuse_lora_layers

    input_ids = torch.randint(0, 1000, (3, 10))

    def forward_backward(policy):
        policy.zero_grad()
        logits = policy(input_ids=input_ids).logits
        (logits.log_softmax(-1)[..., :7] * torch.linspace(-1, 1, 7)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    peft_policy, fused_policy = _trained_lora(tiny_model_dir), _trained_lora(tiny_model_dir)
    layers = sum(1 for m in fused_policy.modules() if hasattr(m, "lora_A"))
    assert fuse_lora_layers(fused_policy) == layers > 0
    expected_logits, expected_grads = forward_backward(peft_policy)
    calls = []
    from rlhf import models

    original_apply = models._LoraLinearFunction.apply
    models._LoraLinearFunction.apply = lambda *a: calls.append(1) or original_apply(*a)
    try:
        logits, grads = forward_backward(fused_policy)
    finally:
        models._LoraLinearFunction.apply = original_apply
    assert len(calls) == layers  # every layer took the fused path
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        assert torch.allclose(grads[name], expected_grads[name], atol=1e-6, rtol=1e-4), name
    with torch.no_grad(), fused_policy.disable_adapter(), peft_policy.disable_adapter():  # the reference
        assert torch.allclose(fused_policy(input_ids=input_ids).logits, peft_policy(input_ids=input_ids).logits)


def test_fused_lora_layers_let_the_model_add_to_their_output_in_place():
    """Falcon's parallel attention/MLP block adds the attention output into the MLP's output in
    place; a view made inside the fused layer's autograd Function would refuse that."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    from rlhf.models import add_lora, disable_dropout, fuse_lora_layers

    def forward_backward(fuse):
        torch.manual_seed(0)
        model = FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True,
                                               bias=False, alibi=False))
        disable_dropout(model)
        policy = add_lora(model, 4, 8, 0.0, ["all-linear"])
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
        if fuse:
            assert fuse_lora_layers(policy) > 0
        logits = policy(input_ids=torch.arange(12).view(2, 6)).logits
        logits.log_softmax(-1)[..., 0].sum().backward()
        return logits.detach(), [p.grad for n, p in policy.named_parameters() if "lora_A" in n]

    (fused_logits, fused_grads), (peft_logits, peft_grads) = forward_backward(True), forward_backward(False)
    assert torch.allclose(fused_logits, peft_logits, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(fused_grads, peft_grads))


def test_fused_lora_layers_gradcheck():
    import torch

    from rlhf.models import lora_linear

    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 3, 5, dtype=torch.double), torch.randn(4, 5, dtype=torch.double), torch.randn(4, dtype=torch.double)
    lora_a, lora_b = torch.randn(2, 5, dtype=torch.double), torch.randn(4, 2, dtype=torch.double)
    inputs = [t.requires_grad_() for t in (x, weight, bias, lora_a, lora_b)]
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 0.7), inputs)
    # Second derivatives too (TRPO's Fisher-vector products; issue 16: they were wrong before).
    assert torch.autograd.gradgradcheck(lambda *t: lora_linear(*t, 0.7), inputs)


def test_fusing_skips_bfloat16_and_dropout_layers(tiny_model_dir):
    import torch

    from rlhf.models import add_lora, fuse_lora_layers, load_base_model

    assert fuse_lora_layers(_trained_lora(tiny_model_dir, dtype=torch.bfloat16)) == 0
    assert fuse_lora_layers(add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.1, ["all-linear"])) == 0


def test_fused_lora_layers_leave_autocast_to_peft(tiny_model_dir):
    import torch

    from rlhf.models import fuse_lora_layers

    input_ids = torch.randint(0, 1000, (2, 6))
    peft_policy, fused_policy = _trained_lora(tiny_model_dir), _trained_lora(tiny_model_dir)
    fuse_lora_layers(fused_policy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = peft_policy(input_ids=input_ids).logits
        got = fused_policy(input_ids=input_ids).logits  # the fused addmm_ would fail on mixed dtypes
    assert torch.equal(got, expected)


def test_chunked_projection_gives_the_logprobs_entropy_and_gradients_of_full_logits(monkeypatch):
    import torch

    import rlhf.algorithms.logits as logits_module
    from rlhf.algorithms import logprobs_and_entropy_from_logits, logprobs_from_hidden

    monkeypatch.setattr(logits_module, "CHUNK_LOGITS", 50 * 7)  # 7 rows per chunk: 3 chunks and a partial one
    torch.manual_seed(0)
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (3, 8))
    upstream = torch.randn(3, 8)
    for temperature in (1.0, 0.7):
        expected, expected_entropy = logprobs_and_entropy_from_logits(hidden @ weight.t() / temperature, labels)
        (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
        got, entropy = logprobs_from_hidden(hidden, weight, labels, temperature, with_entropy=True)
        (grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
        assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(entropy, expected_entropy, atol=1e-5)
        assert torch.allclose(grad, expected_grad, atol=1e-5)
        assert logprobs_from_hidden(hidden, weight, labels, temperature)[1] is None


@pytest.mark.parametrize("share_prompt_prefix", [False, True])
def test_chunked_logprobs_in_the_model_equal_the_full_logits_path(tiny_model_dir, share_prompt_prefix, monkeypatch):
    """PolicyWithValue with chunk_logits_bytes=0 (always chunk): logprobs, values, entropy and the
    LoRA and value-head gradients equal the full-logits path's."""
    import torch

    import rlhf.algorithms.logits as logits_module
    from rlhf.models import PolicyWithValue, ValueHead, add_lora, fuse_lora_layers, load_base_model
    from rlhf.rollout import Rollout, forward_response

    monkeypatch.setattr(logits_module, "CHUNK_LOGITS", logits_module.CHUNK_LOGITS // 4096)  # several chunks
    torch.manual_seed(0)
    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"])
    fuse_lora_layers(policy)
    for parameter in policy.parameters():
        if parameter.requires_grad:  # LoRA B starts at 0: make the adapter matter
            torch.nn.init.normal_(parameter, std=0.05)
    head = ValueHead(32)
    torch.nn.init.normal_(head.summary.weight, std=0.1)
    prompt, length = 6, 9
    ids = torch.randint(0, 1000, (4, prompt + length))
    ids[1, :prompt] = ids[2, :prompt]  # two rows share a prompt (a group)
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # left padding
    rollout = Rollout(input_ids=ids, attention_mask=attention, response_ids=ids[:, prompt:], mask=torch.ones(4, length),
                      eos_found=torch.zeros(4, dtype=torch.bool), group_ids=torch.arange(4), prompts=[""] * 4,
                      completions=[""] * 4)
    results = {}
    for chunk in (None, 0):
        model = PolicyWithValue(policy, head, share_prompt_prefix=share_prompt_prefix, chunk_logits_bytes=chunk)
        policy.zero_grad()
        head.zero_grad()
        logprobs, values, entropy = forward_response(model, rollout, slice(None), 0.7, with_entropy=True)
        ((logprobs * torch.linspace(0, 1, length)).sum() + values.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in [*policy.parameters(), *head.parameters()] if p.requires_grad])
        results[chunk] = (logprobs.detach(), values.detach(), entropy, grads)
        # probed for the chunked head, and for the shared prefix's forward without the head
        assert model._plain_projection is (True if chunk == 0 or share_prompt_prefix else None)
    for full, chunked in zip(results[None], results[0]):
        assert torch.allclose(full, chunked, atol=2e-5)


@pytest.mark.parametrize("share_prompt_prefix", [False, True])
def test_entropy_bonus_forward_takes_the_chunked_head_with_the_entropys_gradient(tiny_model_dir, share_prompt_prefix,
                                                                                  monkeypatch):
    """The update's forward for an entropy bonus: through the chunked LM head (no [B, T, V] logits)
    its logprobs, values, entropy and the gradients of a loss on all three equal the full logits'
    (autograd through log_softmax); without chunking it is that computation, as before."""
    from types import SimpleNamespace

    import torch

    import rlhf.algorithms.logits as logits_module
    from rlhf.algorithms import entropy_from_logits, logprobs_from_logits
    from rlhf.models import PolicyWithValue, ValueHead, add_lora, fuse_lora_layers, load_base_model
    from rlhf.rollout import Rollout
    from rlhf.update import GradientUpdate

    monkeypatch.setattr(logits_module, "CHUNK_LOGITS", logits_module.CHUNK_LOGITS // 4096)  # several chunks
    torch.manual_seed(0)
    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"])
    fuse_lora_layers(policy)
    for parameter in policy.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)
    head = ValueHead(32)
    torch.nn.init.normal_(head.summary.weight, std=0.1)
    prompt, length, temperature = 6, 9, 0.7
    ids = torch.randint(0, 1000, (4, prompt + length))
    ids[1, :prompt] = ids[2, :prompt]
    attention = torch.ones_like(ids)
    attention[0, :2] = 0
    rollout = Rollout(input_ids=ids, attention_mask=attention, response_ids=ids[:, prompt:], mask=torch.ones(4, length),
                      eos_found=torch.zeros(4, dtype=torch.bool), group_ids=torch.arange(4), prompts=[""] * 4,
                      completions=[""] * 4)
    weights = torch.randn(3, 4, length)

    def run(forward):
        policy.zero_grad()
        head.zero_grad()
        logprobs, values, entropy = forward()
        ((logprobs * weights[0]).sum() + (values * weights[1]).sum() + (entropy * weights[2]).sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in [*policy.parameters(), *head.parameters()] if p.requires_grad])
        return logprobs.detach(), values.detach(), entropy.detach(), grads

    def full_logits(model):  # the bonus's computation before the chunked path took it
        logits, values, _ = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                  position_ids=rollout.position_ids, response_length=rollout.response_length)
        logits = logits.float() / temperature
        return logprobs_from_logits(logits, rollout.response_ids), values, entropy_from_logits(logits)

    results = {}
    for chunk in (None, 0):
        model = PolicyWithValue(policy, head, share_prompt_prefix=share_prompt_prefix, chunk_logits_bytes=chunk)
        update = SimpleNamespace(model=model, config=SimpleNamespace(temperature=temperature))
        results[chunk] = run(lambda: GradientUpdate._forward_with_entropy_gradient(update, rollout))
        if chunk is None:
            for got, expected in zip(results[chunk], run(lambda: full_logits(model))):
                assert torch.equal(got, expected)
    assert results[0][3].abs().max() > 0
    for full, chunked in zip(results[None], results[0]):
        assert torch.allclose(full, chunked, atol=2e-5)


def test_models_whose_logits_are_not_the_plain_lm_head_keep_full_logits(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from rlhf.models import add_lora, load_base_model, plain_output_projection

    assert plain_output_projection(add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"]))
    # LoRA on the LM head: its weight alone is not the projection
    assert not plain_output_projection(add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["q_proj", "lm_head"]))
    # Gemma 2 soft-caps its logits: tanh(z / 30) * 30 is not z
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=0.5))
    assert not plain_output_projection(add_lora(gemma, 4, 8, 0.0, ["all-linear"]))


@pytest.mark.parametrize("onednn", [False, True], ids=["blas", "onednn"])
def test_inference_linears_sample_the_same_tokens_and_are_put_back(tiny_model_dir, monkeypatch, onednn):
    """Decoding through the faster product (W @ x^T on BLAS, or oneDNN) gives the plain layers'
    logits (to float rounding) and the same samples; training forwards (grad on) take the plain
    path, and so do wide inputs on BLAS; exit restores the layers."""
    import torch

    from rlhf import cpu_linear, decode_linear
    from rlhf.models import WEIGHT_MAJOR_MAX_ROWS, inference_linears, load_base_model
    from rlhf.rollout import sample_responses

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: onednn)
    cpu_linear.onednn_packing_usable()  # its probe (once per process) is not a routed product
    routed = []
    monkeypatch.setattr(cpu_linear, "onednn_linear",
                        lambda *args, _real=cpu_linear.onednn_linear: routed.append(1) or _real(*args))
    monkeypatch.setattr("rlhf.models.onednn_linear", cpu_linear.onednn_linear)
    # the sampler's packed weights may take the decode kernel instead: oneDNN's sums (rlhf.decode_linear)
    monkeypatch.setattr(decode_linear, "linear",
                        lambda *args, _real=decode_linear.linear: routed.append(1) or _real(*args))
    model = load_base_model(str(tiny_model_dir)).eval()
    ids = torch.randint(0, 1000, (5, 7))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0

    def sample(seed):
        torch.manual_seed(seed)
        return sample_responses(model, ids, attention, max_new_tokens=6, temperature=1.0, top_p=1.0,
                                eos_token_ids=[10 ** 6], pad_token_id=0)[0]

    with torch.no_grad():
        plain_logits = model(input_ids=ids, attention_mask=attention).logits
        plain_samples = sample(3)
        with inference_linears(model):
            assert "forward" in vars(model.lm_head)
            logits = model(input_ids=ids, attention_mask=attention).logits
            samples = sample(3)
    assert torch.allclose(logits, plain_logits, atol=1e-5) and torch.equal(samples, plain_samples)
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bool(routed) == onednn

    calls = []
    routed.clear()
    with inference_linears(model):
        original = torch.Tensor.t
        torch.Tensor.t = lambda self: calls.append(1) or original(self)
        try:
            model(input_ids=ids)  # grad enabled: the plain path
            assert not calls and not routed
            with torch.no_grad():
                model(input_ids=torch.randint(0, 1000, (1, WEIGHT_MAJOR_MAX_ROWS + 1)))  # a prefill
            assert not calls and bool(routed) == onednn
            with torch.no_grad():
                model(input_ids=ids[:, :1])
            # a few rows without grad take W @ x^T on BLAS (the tiny layers stay there also with
            # oneDNN on: below rlhf.cpu_linear.MIN_WEIGHT_ELEMENTS; the 1000-word LM head routes)
            assert calls and bool(routed) == onednn
        finally:
            torch.Tensor.t = original


def test_narrowed_micro_batch_gives_the_full_rows_logprobs_values_and_gradients(tiny_model_dir):
    """The update forwards a micro-batch without its all-padding columns (left prompt padding no
    row uses, response columns after its longest response): same logprobs, values and gradients."""
    import torch

    from rlhf.models import PolicyWithValue, ValueHead, add_lora, load_base_model
    from rlhf.rollout import Rollout, forward_response

    torch.manual_seed(0)
    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"])
    for parameter in policy.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)
    model = PolicyWithValue(policy, ValueHead(32))
    prompt, length = 7, 10
    ids = torch.randint(0, 1000, (4, prompt + length))
    attention = torch.ones_like(ids)
    attention[:, :3] = 0  # three padding columns in every row
    attention[1, 3] = 0
    mask = torch.zeros(4, length)
    for row, real in enumerate([6, 4, 2, 10]):
        mask[row, :real] = 1
        attention[row, prompt + real:] = 0
    rollout = Rollout(input_ids=ids, attention_mask=attention, response_ids=ids[:, prompt:], mask=mask,
                      eos_found=torch.ones(4, dtype=torch.bool), group_ids=torch.arange(4), prompts=list("abcd"),
                      completions=list("abcd"))
    rows = torch.tensor([2, 0, 1])  # the longest response (row 3) is not in this micro-batch
    narrow, width = rollout.narrowed(rows)
    assert width == 6 and narrow.input_ids.shape == (3, prompt - 3 + 6) and narrow.prompts == ["c", "a", "b"]

    def run(batch, index):
        policy.zero_grad()
        logprobs, values, _ = forward_response(model, batch, index, 1.0)
        real = batch.mask[index] if isinstance(index, torch.Tensor) else batch.mask
        ((logprobs * real).sum() + (values * real).sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad])
        return logprobs.detach(), values.detach(), grads

    full_lp, full_values, full_grads = run(rollout, rows)
    lp, values, grads = run(narrow, slice(None))
    real = mask[rows, :width].bool()
    assert torch.allclose(lp[real], full_lp[:, :width][real], atol=1e-5)
    assert torch.allclose(values[real], full_values[:, :width][real], atol=1e-5)
    assert torch.allclose(grads, full_grads, atol=1e-5)


def test_projection_probe_says_no_instead_of_failing_and_layers_with_own_forward_keep_it(tiny_model_dir):
    import torch

    from rlhf.models import add_lora, load_base_model, plain_output_projection, inference_linears

    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"])
    decoder = policy.get_base_model().get_decoder()
    decoder.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("expected m1 and m2 same dtype"))
    assert not plain_output_projection(policy)
    del decoder.forward

    model = load_base_model(str(tiny_model_dir)).eval()
    own = lambda x: torch.zeros(*x.shape[:-1], model.lm_head.out_features)  # e.g. an offload hook
    model.lm_head.forward = own
    with torch.no_grad(), inference_linears(model):
        with inference_linears(model):  # nested: the inner one leaves the outer's layers alone
            pass
        assert model.lm_head.forward is own
    assert model.lm_head.forward is own


def test_preallocated_kv_cache_samples_what_the_concatenating_cache_samples(tiny_model_dir, monkeypatch):
    """Sampling with the in-place KV cache gives the same tokens as transformers' DynamicCache
    (which concatenates), with left padding and with the shared-prompt prefill; the model
    really decodes on PreallocatedLayer buffers, not on copies."""
    import torch

    import rlhf.rollout as rollout
    from rlhf.kv_cache import PreallocatedLayer
    from rlhf.models import load_base_model

    model = load_base_model(str(tiny_model_dir)).eval()
    ids = torch.randint(3, 1000, (3, 6)).repeat_interleave(2, dim=0)  # 3 prompts x 2 samples
    attention = torch.ones_like(ids)
    attention[:2, :2] = 0

    layer_types = []
    plain_forward = model.forward

    def recording_forward(*args, **kwargs):
        if kwargs.get("cache") is not None:
            layer_types.append({type(layer) for layer in kwargs["cache"].layers})
        return plain_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)

    def sample(share: bool, seed: int = 5):
        torch.manual_seed(seed)
        return rollout.sample_responses(model, ids, attention, max_new_tokens=9, temperature=1.0, top_p=1.0,
                                        eos_token_ids=[10 ** 6], pad_token_id=0, share_prompt_prefix=share)[0]

    for share in (False, True):
        layer_types.clear()
        in_place = sample(share)
        assert all(types == {PreallocatedLayer} for types in layer_types[1 + share:]), layer_types
        with monkeypatch.context() as patch:
            patch.setattr(rollout, "preallocated", lambda cache, more, bounded=False: cache)
            concatenating = sample(share)
        assert in_place.shape == (6, 9) and torch.equal(in_place, concatenating)


def test_a_preallocated_layer_grown_in_inference_mode_stays_writable_outside_it():
    """The sampler's decode steps run in inference mode (rlhf.sampling_forward); a cache layer that
    must grow there takes new buffers, which the model's own forward (past a sliding window's edge)
    then writes in place outside inference mode."""
    import torch

    from rlhf.kv_cache import PreallocatedLayer

    keys, values = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    layer = PreallocatedLayer(keys, values, capacity=3)  # full: the next token makes it grow
    first_key, first_value, second_key, second_value = (torch.randn(2, 1, 1, 4) for _ in range(4))
    with torch.inference_mode():
        layer.update(first_key, first_value)
    layer.update(second_key, second_value)  # in place, outside inference mode
    assert torch.equal(layer.keys, torch.cat([keys, first_key, second_key], dim=-2))
    assert torch.equal(layer.values, torch.cat([values, first_value, second_value], dim=-2))


def test_preallocated_layer_grows_and_survives_what_transformers_does_to_caches(tiny_model_dir):
    """Logits of each step equal the concatenating cache's when the buffer must grow, after
    batch selection (beam search, shared prompts), after crop (assisted decoding) and reset."""
    import torch
    from transformers import DynamicCache

    from rlhf.kv_cache import PreallocatedLayer, preallocated
    from rlhf.models import load_base_model

    model = load_base_model(str(tiny_model_dir)).eval()
    ids = torch.randint(3, 1000, (4, 12))

    def decode(convert: bool) -> list[torch.Tensor]:
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids[:, :4], use_cache=True)
            cache = preallocated(out.cache, 1) if convert else out.cache  # room for 1: must grow
            for t in range(4, 8):
                out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
                logits.append(out.logits)
            cache.batch_select_indices(torch.tensor([3, 1]))
            for t in range(8, 10):
                out = model(input_ids=ids[[3, 1], t:t + 1], cache=cache, use_cache=True)
                logits.append(out.logits)
            cache.crop(-2)
            out = model(input_ids=ids[[3, 1], 8:10], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache.reset()
            logits.append(model(input_ids=ids[[3, 1], :3], cache=cache, use_cache=True).logits)
        if convert:
            assert {type(layer) for layer in cache.layers} == {PreallocatedLayer}
            assert cache.get_seq_length() == 3
        return logits

    for in_place, concatenating in zip(decode(True), decode(False), strict=True):
        assert torch.allclose(in_place, concatenating, atol=1e-5)
    assert preallocated("not a DynamicCache", 3) == "not a DynamicCache"
    assert isinstance(preallocated(DynamicCache(), 3), DynamicCache)  # empty layers left alone


def test_rows_to_keep_drops_finished_rows_in_large_cuts():
    from rlhf.rollout import rows_to_keep

    done = lambda *flags: torch.tensor([bool(flag) for flag in flags])  # noqa: E731
    assert rows_to_keep(done(*[0] * 15, 1)) is None  # one of sixteen: not yet an eighth
    assert rows_to_keep(done(0, 1, *[0] * 13, 1)).tolist() == [0, *range(2, 15)]
    assert rows_to_keep(done(0, 0, 0, 0, 0, 0, 0, 1)).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert rows_to_keep(done(1, 1, 1, 0)).tolist() == [3]
    assert rows_to_keep(done(0, 0)) is None and rows_to_keep(done(1, 0)).tolist() == [1]


@pytest.mark.parametrize("share", [False, True])
def test_dropping_finished_rows_from_the_decode_batch_keeps_every_rows_tokens(tiny_model_dir, monkeypatch, share):
    """Rows end at different steps (stop tokens picked from a first draw); with the finished
    rows dropped from the batch and its KV cache the responses and their logprobs are those of the
    full batch, and the batch really shrinks."""
    from rlhf import rollout
    from rlhf.models import load_base_model

    model = load_base_model(str(tiny_model_dir)).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (4, 5)).repeat_interleave(3, dim=0)  # 4 prompts x 3 samples
    attention = torch.ones_like(ids)
    attention[:3, :2] = 0
    batch_sizes = []
    plain_forward = model.forward

    def recording_forward(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return plain_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)

    def sample(compact: bool, stops: list[int]):
        batch_sizes.clear()
        torch.manual_seed(7)
        return rollout.sample_responses(model, ids, attention, max_new_tokens=24, temperature=1.0, top_p=1.0,
                                        eos_token_ids=stops, pad_token_id=1,
                                        share_prompt_prefix=share, compact_finished_rows=compact)

    endless = sample(False, [10 ** 6])[0]  # the same draws run on until a stop token
    stops = sorted({int(endless[row, column]) for row, column in [(0, 2), (4, 5), (7, 9), (9, 12), (11, 16)]} - {1})
    full_tokens, full_logprobs = sample(False, stops)
    full_batches = list(batch_sizes)
    tokens, logprobs = sample(True, stops)
    ends = (full_tokens != 1).sum(1)
    assert ends.min() < ends.max() - 4  # the rows really end at different steps
    assert set(full_batches[share:]) == {12} and min(batch_sizes) < 12 and len(batch_sizes) == len(full_batches)
    assert torch.equal(tokens, full_tokens)
    assert torch.allclose(logprobs, full_logprobs, atol=1e-5)


def test_preallocated_layer_keeps_its_capacity_when_rows_are_dropped():
    from rlhf.kv_cache import PreallocatedLayer

    keys, values = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 8)
    layer = PreallocatedLayer(keys, values, 10)
    layer.batch_select_indices(torch.tensor([1, 3]))
    assert torch.equal(layer.keys, keys[[1, 3]]) and torch.equal(layer.values, values[[1, 3]])
    new_keys, new_values = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    out_keys, out_values = layer.update(new_keys, new_values)
    assert layer._key_buffer.shape == (2, 2, 10, 8) and out_keys.data_ptr() == layer._key_buffer.data_ptr()
    assert torch.equal(out_keys, torch.cat([keys[[1, 3]], new_keys], dim=2))
    assert torch.equal(out_values, torch.cat([values[[1, 3]], new_values], dim=2))


def test_merged_lora_weights_stay_unmerged_without_memory_for_the_copies(tiny_model_dir, monkeypatch):
    """The merged weights are copies: with no memory for them the adapters sample unmerged
    (before, a model whose weights fit once but not twice ran out of memory while sampling)."""
    from rlhf import models

    policy = _trained_lora(tiny_model_dir)
    input_ids = torch.randint(0, 1000, (3, 12))
    weights = {name: param for name, param in policy.named_parameters()}
    with torch.no_grad():
        unmerged = policy(input_ids=input_ids).logits
        monkeypatch.setattr(models, "available_memory_bytes", lambda: 10 ** 4)
        with models.merged_lora_weights(policy) as sampler:
            assert all(param is weights[name] for name, param in sampler.named_parameters())  # no copies made
            assert not any(m.disable_adapters for m in policy.modules() if hasattr(m, "lora_A"))
            sampled = sampler(input_ids=input_ids).logits
        monkeypatch.setattr(models, "available_memory_bytes", lambda: 10 ** 12)
        with models.merged_lora_weights(policy) as sampler:
            assert any(param is not weights.get(name) for name, param in sampler.named_parameters())
    assert torch.equal(sampled, unmerged)


def test_free_cuda_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """After an update PyTorch keeps the activations' memory reserved: the driver reports it used,
    but new tensors (the merged weights) take it first. Counting only the driver's free memory
    left a GPU run sampling unmerged (slower) whenever the update had been large."""
    from rlhf.models import free_memory_bytes

    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    assert free_memory_bytes(torch.device("cuda", 0)) == 21 * gib
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gib)
    assert free_memory_bytes(torch.device("cuda", 0)) == 1 * gib


@pytest.mark.parametrize("kind", ["modules_to_save", "lora_bias", "transformers_adapter"])
def test_adapters_folding_cannot_represent_sample_unmerged(tiny_model_dir, kind, tmp_path):
    """Folding samples under PeftModel.disable_adapter, which also switches off modules_to_save
    copies; W + s*B@A drops a bias on B; a model with adapters loaded by transformers has no
    disable_adapter. These stay unmerged and sample what their forward computes (before: the
    first two sampled another model, the third crashed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.models import merged_lora_weights

    torch.manual_seed(1)
    settings = (dict(modules_to_save=["lm_head"], target_modules=["q_proj", "v_proj"]) if kind == "modules_to_save"
                else dict(lora_bias=True, target_modules=["q_proj", "v_proj"]) if kind == "lora_bias"
                else dict(target_modules=["q_proj", "v_proj"]))
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, **settings))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    if kind == "transformers_adapter":
        policy.save_pretrained(tmp_path / "adapter")
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        policy.load_adapter(str(tmp_path / "adapter"))
    policy.eval()
    input_ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        expected = policy(input_ids=input_ids).logits
        with merged_lora_weights(policy) as sampler:
            got = sampler(input_ids=input_ids).logits
        assert torch.equal(policy(input_ids=input_ids).logits, expected)  # nothing left changed
    assert torch.equal(got, expected)


def test_the_update_multiplies_by_frozen_weights_through_kept_transposed_copies(tiny_model_dir, tmp_path, monkeypatch,
                                                                                onednn_transposes):
    """Every backward product with a frozen weight (the fused LoRA layers' input gradients, the
    chunked LM head's p W) runs inside the update's ``transposed_weights_kept``, and the copies are
    gone once the update is over."""
    from rlhf import cpu_linear, models
    from rlhf.algorithms import logits

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)  # the tiny model's layers routed as large ones
    calls = []
    real = cpu_linear.times_weight

    def spy(x, weight):
        calls.append((cpu_linear._transposed_copies is not None, weight.shape))
        return real(x, weight)

    for module in (models, logits):
        monkeypatch.setattr(module, "times_weight", spy)
    config = RLConfig(**{
        **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "max_new_tokens": 6,
        "max_prompt_length": 48,
        "lora_r": 4, "lora_alpha": 8, "save_steps": 0, "num_samples_to_log": 0,
        "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"]})
    from rlhf.update import GradientUpdate

    kept_during_update = []
    real_update = GradientUpdate.__call__

    def update(self, *args):
        result = real_update(self, *args)
        kept_during_update.append(len(cpu_linear._transposed_copies.copies))
        return result

    monkeypatch.setattr(GradientUpdate, "__call__", update)
    trainer = RLTrainer(config)
    trainer.train()
    head = trainer.model.policy.get_output_embeddings().weight.shape
    assert calls and all(in_scope for in_scope, _ in calls)
    assert head in {shape for _, shape in calls} and len({shape for _, shape in calls}) > 1
    assert kept_during_update[0] > 1 and cpu_linear._transposed_copies is None


def test_the_update_keeps_no_transposes_where_its_longest_micro_batch_needs_the_memory(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, onednn_transposes):
    """Responses that end at different lengths: the update's first micro-batch holds the shortest,
    the last the longest, with more than twice its token positions. Memory that the first one's
    forward halved (the fake below) leaves nothing for copies once the last one's share is kept
    free; copies made anyway would take memory that micro-batch's activations need."""
    from rlhf import cpu_linear, rollout as rollout_module
    from rlhf import sampling_forward  # noqa: F401  (bound to the real memory reading before the fake below)
    from rlhf.update import GradientUpdate

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)
    real_sample = rollout_module.sample_responses

    def half_stop_at_once(*args, **kwargs):
        tokens, logprobs = real_sample(*args, **kwargs)
        stop = kwargs["eos_token_ids"]
        stop = stop if isinstance(stop, int) else list(stop)[0]
        tokens[::2, 0], tokens[::2, 1:], logprobs[::2, 1:] = stop, kwargs["pad_token_id"], 0.0
        return tokens, logprobs

    monkeypatch.setattr(rollout_module, "sample_responses", half_stop_at_once)
    start = 10 ** 12
    told, copies = [], []

    def free_memory():  # until the first micro-batch starts, then half of it once its forward ran
        return start if not told else start // 2

    monkeypatch.setattr(cpu_linear, "available_memory_bytes", free_memory)
    real_expect, real_micro_step = cpu_linear.expect_micro_batch, GradientUpdate.micro_step

    def expect(positions, largest):
        real_expect(positions, largest)
        told.append((positions, largest))

    def micro_step(self, *args, **kwargs):
        result = real_micro_step(self, *args, **kwargs)
        copies.append(len(cpu_linear._transposed_copies.copies))
        return result

    monkeypatch.setattr("rlhf.update.expect_micro_batch", expect)
    monkeypatch.setattr(GradientUpdate, "micro_step", micro_step)
    config = RLConfig(**{
        **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "ppo_epochs": 1,
        "gradient_accumulation_steps": 2, "max_new_tokens": 40, "max_prompt_length": 48, "lora_r": 4,
        "lora_alpha": 8, "save_steps": 0, "num_samples_to_log": 0,
        "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"]})
    RLTrainer(config).train()
    (first, largest), (last, _) = told[0], told[-1]
    assert len(told) == 2 and largest == last > 2 * first  # the long rows run second
    assert copies == [0, 0]


def _cache_bytes_after(model, rows: int, positions: int) -> int:
    """Bytes of keys and values a real forward of ``rows`` x ``positions`` tokens leaves in the cache."""
    with torch.no_grad():
        cache = model(input_ids=torch.randint(1, 100, (rows, positions)), use_cache=True).past_key_values
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_kv_cache_bytes_is_what_a_real_cache_holds():
    """Against the cache a forward leaves: grouped KV heads with a head size of its own (not
    hidden / heads), a bfloat16 model, a LoRA-wrapped one; a config with per-layer settings
    (transformers raises on its global attributes) and one without attention give 0, never raise."""
    from types import SimpleNamespace

    import transformers
    from peft import LoraConfig, get_peft_model

    from rlhf.kv_cache import kv_cache_bytes

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    model = transformers.LlamaForCausalLM(config).eval()
    assert kv_cache_bytes(model, 3, 7) == _cache_bytes_after(model, 3, 7) == 2 * 3 * 2 * 24 * 4 * 3 * 7
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert kv_cache_bytes(wrapped, 3, 7) == _cache_bytes_after(model, 3, 7)
    half = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    assert kv_cache_bytes(half, 2, 5) == _cache_bytes_after(half, 2, 5) == 2 * 3 * 2 * 24 * 2 * 2 * 5
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16)).eval()
    assert kv_cache_bytes(qwen3, 2, 9) == _cache_bytes_after(qwen3, 2, 9)

    class PerLayerAttributeError(RuntimeError):
        pass

    class PerLayerConfig:  # what transformers 5 does for a global read of a per-layer setting
        num_hidden_layers, num_attention_heads = 2, 4

        def __getattr__(self, name):
            raise PerLayerAttributeError(name)

    assert kv_cache_bytes(SimpleNamespace(config=PerLayerConfig(), parameters=lambda: iter(())), 3, 50) == 0
    assert kv_cache_bytes(SimpleNamespace(config=SimpleNamespace(hidden_size=8)), 3, 50) == 0  # not an attention model
    assert kv_cache_bytes(object(), 3, 50) == 0


def _records_whether_sampling_folds_the_lora(monkeypatch, module) -> list[bool]:
    """Patch ``module.generate_rollout`` to record, per call, whether the model it samples from has
    its LoRA folded into the weights (``merged_lora_weights`` samples with the adapters switched off)."""
    folded = []
    real_generate = module.generate_rollout

    def generate(model, *args, **kwargs):
        folded.append(any(layer.disable_adapters for layer in model.modules() if hasattr(layer, "lora_A")))
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(module, "generate_rollout", generate)
    return folded


def test_the_rollout_leaves_room_for_its_kv_cache_before_folding_the_lora(tiny_model_dir, tmp_path, monkeypatch):
    """With free memory over twice the LoRA base weights but not over that plus the KV cache the
    rollout will fill (its chunk's rows, prompt and response at their caps), the rollout samples
    with the adapters unfolded; with more memory it folds them. Before, the cache was not counted
    and the copies were made."""
    from rlhf import models, rollout
    from rlhf.kv_cache import kv_cache_bytes

    config = RLConfig(**{
        **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "max_new_tokens": 6,
        "max_prompt_length": 48, "lora_r": 4, "lora_alpha": 8, "save_steps": 0, "num_samples_to_log": 0,
        "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"]})
    trainer = RLTrainer(config)
    policy = trainer.model.policy
    lora_bases = sum(m.get_base_layer().weight.nbytes for m in policy.modules() if hasattr(m, "lora_A"))
    cache = kv_cache_bytes(policy, 4, 48 + 6)
    assert cache > 0
    free = {"bytes": 2 * lora_bases + cache - 1}
    monkeypatch.setattr(models, "available_memory_bytes", lambda: free["bytes"])
    folded = _records_whether_sampling_folds_the_lora(monkeypatch, rollout)
    trainer.rollout()
    free["bytes"] = 2 * lora_bases + cache + 1
    trainer.rollout()
    assert folded == [False, True]


def test_evaluation_leaves_room_for_its_kv_cache_before_folding_the_lora(tiny_model_dir, monkeypatch):
    from datasets import Dataset

    from reward_models import CombinedReward
    from rlhf import evaluate, models
    from rlhf.kv_cache import kv_cache_bytes
    from rlhf.models import load_tokenizer

    reward = CombinedReward([f"{FIXTURES / 'rewards.py'}:char_diversity"])
    policy = _trained_lora(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = Dataset.from_dict({"prompt": ["one two", "three four five"]})
    lora_bases = sum(m.get_base_layer().weight.nbytes for m in policy.modules() if hasattr(m, "lora_A"))
    cache = kv_cache_bytes(policy, 4, 32 + 5)  # 2 prompts x 2 samples in one chunk
    free = {"bytes": 0}
    monkeypatch.setattr(models, "available_memory_bytes", lambda: free["bytes"])
    folded = _records_whether_sampling_folds_the_lora(monkeypatch, evaluate)
    for extra in (-1, 1):
        free["bytes"] = 2 * lora_bases + cache + extra
        evaluate.sample_and_score(policy, tokenizer, prompts, [0, 1], reward, base=None, num_samples=2,
                                  max_new_tokens=5, max_prompt_length=32)
    assert folded == [False, True]


def test_each_sampling_weight_copy_leaves_room_for_the_reserve(tiny_model_dir, monkeypatch):
    """Folding the LoRA, packing the linears and fusing q/k/v and gate/up each make a copy only
    where free memory holds twice it plus the reserve (the KV cache to come)."""
    from rlhf import cpu_linear, models, sampling_forward

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)
    policy = _trained_lora(tiny_model_dir)
    reserve = 10 ** 6
    lora_bases = sum(m.get_base_layer().weight.nbytes for m in policy.modules() if hasattr(m, "lora_A"))
    free = {"bytes": 0}
    for module in (models, sampling_forward):
        monkeypatch.setattr(module, "available_memory_bytes", lambda: free["bytes"])
    weights = {name: param for name, param in policy.named_parameters()}
    for extra, folds in ((-1, False), (1, True)):
        free["bytes"] = 2 * lora_bases + reserve + extra
        with models.merged_lora_weights(policy, reserve) as sampler:
            assert any(param is not weights.get(name) for name, param in sampler.named_parameters()) == folds

    packed = []
    real_pack = models.pack_for_sampling
    monkeypatch.setattr(models, "pack_for_sampling", lambda weight: packed.append(1) or real_pack(weight))
    base = policy.get_base_model()
    linears = [m for m in base.modules() if type(m) is torch.nn.Linear]
    linear_bytes = sum(m.weight.nbytes for m in linears)
    x = torch.randn(3, linears[0].in_features)
    for extra, packs in ((-1, False), (1, True)):
        free["bytes"] = 2 * linear_bytes + reserve + extra
        packed.clear()
        with torch.no_grad(), models.inference_linears(base, reserve):
            linears[0](x)
        assert bool(packed) == (packs and cpu_linear.onednn_packing_usable() and cpu_linear.use_onednn())

    with policy.disable_adapter(), models.inference_linears(policy):
        fused_bytes = sum(getattr(layer, f"{name}_proj").get_base_layer().weight.nbytes
                          for block in base.model.layers for layer, names in ((block.self_attn, "qkv"),
                                                                               (block.mlp, ("gate", "up")))
                          for name in names)
        for extra, fuses in ((-1, False), (1, True)):
            free["bytes"] = 2 * fused_bytes + reserve + extra
            forward = sampling_forward.sampling_forward(policy, fuse=True, reserve_bytes=reserve)
            assert forward is not None
            onednn_fuses = cpu_linear.onednn_packing_usable() and cpu_linear.use_onednn()
            assert any(layer.qkv is not None for layer in forward.layers) == (fuses and onednn_fuses)


@pytest.mark.parametrize("rows", [8, 15, 22, 29, 36, 43])
def test_chunked_logprobs_are_the_whole_batchs_whatever_row_falls_last(monkeypatch, rows):
    """Chunks never leave one row alone (a one-row product takes another kernel and rounds
    differently): logprobs, entropy and the hidden state's gradient equal the unchunked product's
    bitwise. Before, 7-row chunks left a single row at the end of each of these batches.

    Bitwise only where this machine's products of a chunk's rows give the whole batch's rows
    bitwise: on the AMD EPYCs (Zen 1, Zen 3, AVX-512 Zen 4) every product of 2+ rows does; an
    Intel Xeon with AVX-512 FP16 (2026-12-07) rounds 4-row products otherwise than 8-row ones
    (one float32 ulp), and there the results agree to float rounding. Real chunks hold hundreds
    of rows (CHUNK_LOGITS over the vocabulary)."""
    from rlhf import cpu_linear
    from rlhf.algorithms import logits as logits_module

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)  # small weights take oneDNN too, as large ones do
    torch.manual_seed(0)
    weight = torch.randn(1024, 96) * 0.1
    hidden = torch.randn(1, rows, 96, requires_grad=True)
    labels = torch.randint(0, 1024, (1, rows))
    results = []
    for chunk in (2 ** 22, 7 * 1024):
        monkeypatch.setattr(logits_module, "CHUNK_LOGITS", chunk)
        logprobs, entropy = logits_module.logprobs_from_hidden(hidden, weight, labels, 1.0, True)
        results.append((logprobs, entropy, torch.autograd.grad(logprobs.sum(), hidden)[0]))
    chunks = logits_module.row_chunks(rows, 1024)
    assert len(chunks) > 1 and all(c.stop - c.start > 1 for c in chunks)
    flat = hidden.detach()[0]
    probabilities = torch.softmax(cpu_linear.times_transposed(flat, weight), -1)
    kernels_agree = all(
        torch.equal(cpu_linear.times_transposed(flat[c], weight), cpu_linear.times_transposed(flat, weight)[c])
        and torch.equal(cpu_linear.times_weight(probabilities[c], weight), cpu_linear.times_weight(probabilities, weight)[c])
        for c in chunks)
    for whole, chunked in zip(*results):
        if kernels_agree:
            assert torch.equal(whole, chunked)
        else:
            torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_select_cache_rows_takes_the_rows_and_adds_each_rows_gradient_into_its_prompt(monkeypatch):
    """``select_cache_rows`` gives ``batch_select_indices``' keys and values; the backward adds each
    row's gradient into its source row in row order (index_add_), so the prompts' gradients are the
    indexing's up to float rounding. A preallocated layer keeps its own selection (its capacity)."""
    from transformers.cache_utils import DynamicCache

    from rlhf.kv_cache import PreallocatedLayer, select_cache_rows

    torch.manual_seed(0)
    rows = torch.tensor([2, 0, 1, 2, 0, 1, 1, 0])
    sources = [torch.randn(3, 2, 5, 4, requires_grad=True) for _ in range(4)]
    grads = [torch.randn(8, 2, 5, 4) for _ in range(4)]
    selected = {}
    for how in ("indexing", "index_select"):
        cache = DynamicCache()
        for layer in range(2):
            cache.update(sources[2 * layer] * 1.0, sources[2 * layer + 1] * 1.0, layer)
        if how == "indexing":
            cache.batch_select_indices(rows)
        else:
            select_cache_rows(cache, rows)
        outputs = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        selected[how] = [tensor.detach() for tensor in outputs], torch.autograd.grad(outputs, sources, grads)
    (indexed, indexed_grads), (taken, taken_grads) = selected["indexing"], selected["index_select"]
    assert all(torch.equal(a, b) for a, b in zip(indexed, taken))
    for source_grad, indexed_grad, row_grad in zip(taken_grads, indexed_grads, grads):
        in_row_order = torch.zeros_like(source_grad)
        for row, source in enumerate(rows.tolist()):
            in_row_order[source] += row_grad[row]
        assert torch.equal(source_grad, in_row_order)
        assert torch.allclose(source_grad, indexed_grad, rtol=1e-5, atol=1e-6)

    layer = PreallocatedLayer(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), 12)
    cache = DynamicCache()
    cache.layers = [layer]
    select_cache_rows(cache, rows)
    assert layer.keys.shape == (8, 2, 5, 4) and layer._key_buffer.shape[-2] == 12

    cache = DynamicCache()  # a selection set on the instance (carrying more per row) is the one taken
    cache.update(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), 0)
    cache.batch_select_indices = lambda indices: selections.append(indices.tolist())
    selections = []
    select_cache_rows(cache, rows)
    assert selections == [rows.tolist()] and cache.layers[0].keys.shape[0] == 3

    # off the CPU (CUDA's index_add_ adds by atomics, in no fixed order) indexing's selection stays
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, indices: selections.append(indices.device.type))
    cache = DynamicCache()
    cache.update(torch.empty(3, 2, 5, 4, device="meta"), torch.empty(3, 2, 5, 4, device="meta"), 0)
    select_cache_rows(cache, rows.to("meta"))
    assert selections[-1] == "meta"


def test_the_shared_prompt_prefix_runs_without_the_lm_head(tiny_model_dir):
    """The prefix's forward is there for its cache: where the logits are the LM head over the
    decoder's output, it runs the decoder alone (the same cache, bitwise), and a chunked forward
    then calls the LM head module nowhere. Before, the prefix projected its last position."""
    from rlhf.models import PolicyWithValue, add_lora, fuse_lora_layers, load_base_model, shared_prompt_cache
    from rlhf.rollout import Rollout, forward_response

    torch.manual_seed(0)
    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"])
    fuse_lora_layers(policy)
    model = PolicyWithValue(policy, None, share_prompt_prefix=True, chunk_logits_bytes=0)
    decoder = model._decoder_without_head()
    assert decoder is policy.get_base_model().get_decoder()
    prompt, length = 6, 5
    ids = torch.randint(0, 1000, (4, prompt + length))
    ids[1, :prompt] = ids[0, :prompt]
    ids[3, :prompt] = ids[2, :prompt]
    attention = torch.ones_like(ids)
    positions = torch.arange(prompt + length).expand_as(ids)
    with torch.no_grad():
        caches = [shared_prompt_cache(policy, ids, attention, positions, prompt - 1, decoder=given)
                  for given in (None, decoder)]
    assert all(torch.equal(a, b) for a, b in zip(
        [t for layer in caches[0].layers for t in (layer.keys, layer.values)],
        [t for layer in caches[1].layers for t in (layer.keys, layer.values)]))

    head_calls = []
    handle = policy.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    rollout = Rollout(input_ids=ids, attention_mask=attention, response_ids=ids[:, prompt:],
                      mask=torch.ones(4, length), eos_found=torch.zeros(4, dtype=torch.bool),
                      group_ids=torch.tensor([0, 0, 1, 1]), prompts=[""] * 4, completions=[""] * 4)
    forward_response(model, rollout, slice(None), 1.0)[0].sum().backward()
    handle.remove()
    assert head_calls == []


def test_models_whose_logits_are_not_the_plain_lm_head_run_the_prefix_through_the_model(tiny_model_dir):
    """A LoRA on the LM head (or soft-capped, scaled logits) fails the projection probe: the
    prefix's forward keeps the model's own forward."""
    from rlhf.models import PolicyWithValue, add_lora, load_base_model

    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["q_proj", "lm_head"])
    assert PolicyWithValue(policy, None, share_prompt_prefix=True)._decoder_without_head() is None


def test_the_optimizer_is_torchs_fused_adamw_where_weights_are_not_sharded(tiny_model_dir, tmp_path):
    """As transformers' Trainer (so TRL) defaults to on torch >= 2.8: one kernel per tensor."""
    config = RLConfig(**{
        **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "max_new_tokens": 4,
        "lora_r": 4, "lora_alpha": 8, "save_steps": 0, "num_samples_to_log": 0,
        "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"]})
    trainer = RLTrainer(config)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW) and all(group["fused"] for group in optimizer.param_groups)
    trainer.train()
    assert all(state["step"] == 1 for state in optimizer.state.values())


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_resumed_run_takes_its_own_adamw_kernel_not_the_checkpoints(tiny_model_dir, tmp_path, monkeypatch,
                                                                      saved_fused):
    """The checkpoint's saved AdamW settings name its kernel; a run resumed from it takes the one
    this run builds (a checkpoint of the per-op AdamW, as before 2026-12-06, resumes fused; a fused
    one resumes per-op where the run would not fuse), with each step count where that kernel keeps
    it, and trains on. Before, the checkpoint's kernel came back (helper-59's review)."""
    import rlhf.build
    import rlhf.trainer

    settings = {
        **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "max_new_tokens": 4,
        "lora_r": 4, "lora_alpha": 8, "save_steps": 1, "num_samples_to_log": 0,
        "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"]}
    for module in (rlhf.build, rlhf.trainer):
        monkeypatch.setattr(module, "fused_adamw", lambda accelerator: saved_fused)
    RLTrainer(RLConfig(**settings, max_steps=1)).train()
    for module in (rlhf.build, rlhf.trainer):
        monkeypatch.setattr(module, "fused_adamw", lambda accelerator: not saved_fused)
    trainer = RLTrainer(RLConfig(**settings, max_steps=2, resume_from_checkpoint="latest"))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    trainer.train()
    assert trainer.step == 2
    assert all(bool(group["fused"]) is (not saved_fused) for group in optimizer.param_groups)
    assert all(state["step"] == 2 and state["step"].device.type == "cpu" for state in optimizer.state.values())


@pytest.mark.parametrize("changed", ["ids", "given_positions", "padded_mask"])
def test_a_model_whose_forward_changes_its_inputs_keeps_its_forward_for_the_prefix(tiny_model_dir, changed):
    """A CausalLM whose own forward changes its inputs before its decoder (ids >= 1000 become 0;
    position ids moved by 3 where they are given; a padded mask made all ones) fails the
    projection probe, whose ids spread over the vocabulary, with a left-padded row and the
    trainer's position ids: the shared prompt's forward (and the chunked head) run the model, and
    the shared prefix gives the unshared logprobs. With a probe of ids 0..2 and no padding
    (helper-59's and helper-60's reviews) each passed, and the prefix skipped the change (the
    remapped ids' logprobs 0.1 apart)."""
    from transformers import LlamaForCausalLM

    from rlhf.models import PolicyWithValue, add_lora, plain_output_projection

    class ChangedInputs(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            if changed == "ids" and input_ids is not None:
                input_ids = torch.where(input_ids >= 1000, torch.zeros_like(input_ids), input_ids)
            if changed == "given_positions" and position_ids is not None:
                position_ids = position_ids + 3
            if changed == "padded_mask" and attention_mask is not None and not bool(attention_mask.all()):
                attention_mask = torch.ones_like(attention_mask)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **kwargs)

    torch.manual_seed(1)
    policy = add_lora(ChangedInputs.from_pretrained(str(tiny_model_dir)), 4, 8, 0.0, ["q_proj", "v_proj"])
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    assert not plain_output_projection(policy)
    prompt, length = 6, 4
    ids = torch.randint(0, 2000, (4, prompt + length), generator=torch.Generator().manual_seed(3))
    ids[1, :prompt], ids[3, :prompt] = ids[0, :prompt], ids[2, :prompt]
    attention, positions = torch.ones_like(ids), torch.arange(prompt + length).expand_as(ids)
    with torch.no_grad():
        unshared, shared = (PolicyWithValue(policy, None, share_prompt_prefix=share)(
            ids, attention, positions, length, labels=ids[:, prompt:])[0] for share in (False, True))
    assert torch.allclose(unshared, shared, atol=1e-5)
