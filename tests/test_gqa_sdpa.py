"""The update's forward hands SDPA grouped key/value heads as they are (``rlhf.models.gqa_inside_sdpa``)."""
import os

import pytest
import torch

from rlhf import models
from rlhf.models import FORCE_GQA_ENV, PolicyWithValue
from test_speedups import _trained_lora


@pytest.fixture
def sdpa_calls(monkeypatch):
    """(query heads, key heads, enable_gqa) of every SDPA call."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa", False)))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _batch(rows=4, prompt=6, response=5):
    """Two prompts, two rows each, one left-padded (a padding mask, so transformers would repeat the heads)."""
    torch.manual_seed(3)
    prompts = torch.randint(5, 900, (rows // 2, prompt)).repeat_interleave(2, 0)
    ids = torch.cat([prompts, torch.randint(5, 900, (rows, response))], 1)
    mask = torch.ones_like(ids)
    mask[:2, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, response


def _logprobs_and_grads(model, batch):
    ids, mask, positions, response = batch
    model.zero_grad()
    logprobs, _, _ = model(ids, mask, positions, response, labels=ids[:, -response:])
    (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
    return logprobs.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("share_prompt_prefix", [False, True])
def test_the_forward_with_gradients_takes_grouped_heads_and_the_plain_numbers(tiny_model_dir, monkeypatch, sdpa_calls,
                                                                                share_prompt_prefix):
    model = PolicyWithValue(_trained_lora(tiny_model_dir), None, share_prompt_prefix=share_prompt_prefix)
    heads, kv_heads = model.policy.config.num_attention_heads, model.policy.config.num_key_value_heads
    assert kv_heads < heads
    logprobs, grads = _logprobs_and_grads(model, _batch())
    assert sdpa_calls and all(call == (heads, kv_heads, True) for call in sdpa_calls)  # before: (heads, heads, False)
    assert os.environ.get(FORCE_GQA_ENV) is None

    sdpa_calls.clear()
    monkeypatch.setattr(models, "gqa_inside_sdpa", lambda model: __import__("contextlib").nullcontext())
    plain_logprobs, plain_grads = _logprobs_and_grads(model, _batch())
    assert sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)
    assert torch.equal(logprobs, plain_logprobs)
    assert len(grads) == len(plain_grads) > 0
    for grad, plain in zip(grads, plain_grads):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


def test_without_gradients_the_forward_keeps_transformers_choice(tiny_model_dir, sdpa_calls):
    model = PolicyWithValue(_trained_lora(tiny_model_dir), None)
    ids, mask, positions, response = _batch()
    with torch.no_grad():
        model(ids, mask, positions, response, labels=ids[:, -response:])
    heads = model.policy.config.num_attention_heads
    assert sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)


def test_the_switch_is_put_back_after_a_failing_forward_and_a_users_setting_is_kept(tiny_model_dir, monkeypatch):
    policy = _trained_lora(tiny_model_dir)
    with pytest.raises(RuntimeError):
        with models.gqa_inside_sdpa(policy):
            assert os.environ[FORCE_GQA_ENV] == "1"
            raise RuntimeError("a failing forward")
    assert FORCE_GQA_ENV not in os.environ
    monkeypatch.setenv(FORCE_GQA_ENV, "0")
    with models.gqa_inside_sdpa(policy):
        assert os.environ[FORCE_GQA_ENV] == "1"
    assert os.environ[FORCE_GQA_ENV] == "0"


def test_eager_attention_and_full_heads_are_left_alone(tiny_model_dir):
    policy = _trained_lora(tiny_model_dir)
    policy.config._attn_implementation = "eager"
    with models.gqa_inside_sdpa(policy):
        assert FORCE_GQA_ENV not in os.environ
    policy.config._attn_implementation = "sdpa"
    policy.config.num_key_value_heads = policy.config.num_attention_heads
    with models.gqa_inside_sdpa(policy):
        assert FORCE_GQA_ENV not in os.environ


def test_checkpointed_layers_keep_transformers_choice(tiny_model_dir, sdpa_calls):
    """Gradient checkpointing runs a layer's forward again in the backward, outside the switch:
    both passes must take the same path (before, the recomputation failed its shape check)."""
    policy = _trained_lora(tiny_model_dir)
    policy.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.get_base_model().enable_input_require_grads()
    policy.train()
    model = PolicyWithValue(policy, None)
    logprobs, grads = _logprobs_and_grads(model, _batch())
    heads = policy.config.num_attention_heads
    assert grads and sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)
