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
def test_the_forward_with_gradients_takes_grouped_heads_and_the_plain_numbers(tiny_model_dir, sdpa_calls,
                                                                                share_prompt_prefix):
    model = PolicyWithValue(_trained_lora(tiny_model_dir), None, share_prompt_prefix=share_prompt_prefix,
                            grouped_heads_in_sdpa=True)
    heads, kv_heads = model.policy.config.num_attention_heads, model.policy.config.num_key_value_heads
    assert kv_heads < heads
    logprobs, grads = _logprobs_and_grads(model, _batch())
    assert sdpa_calls and all(call == (heads, kv_heads, True) for call in sdpa_calls)  # before: (heads, heads, False)
    assert os.environ.get(FORCE_GQA_ENV) is None

    sdpa_calls.clear()
    model.grouped_heads_in_sdpa = False
    plain_logprobs, plain_grads = _logprobs_and_grads(model, _batch())
    assert sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)
    assert torch.equal(logprobs, plain_logprobs)
    assert len(grads) == len(plain_grads) > 0
    for grad, plain in zip(grads, plain_grads):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


def test_without_gradients_the_forward_keeps_transformers_choice(tiny_model_dir, sdpa_calls):
    model = PolicyWithValue(_trained_lora(tiny_model_dir), None, grouped_heads_in_sdpa=True)
    ids, mask, positions, response = _batch()
    with torch.no_grad():
        model(ids, mask, positions, response, labels=ids[:, -response:])
    heads = model.policy.config.num_attention_heads
    assert sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)


def test_the_switch_is_put_back_after_a_failing_forward_and_a_users_setting_is_kept(tiny_model_dir, monkeypatch,
                                                                                     sdpa_calls):
    policy = _trained_lora(tiny_model_dir)
    with pytest.raises(RuntimeError):
        with models.gqa_inside_sdpa(policy):
            assert os.environ[FORCE_GQA_ENV] == "1"
            raise RuntimeError("a failing forward")
    assert FORCE_GQA_ENV not in os.environ
    monkeypatch.setenv(FORCE_GQA_ENV, "0")  # the user's choice: transformers repeats the heads
    model = PolicyWithValue(policy, None, grouped_heads_in_sdpa=True)
    _logprobs_and_grads(model, _batch())
    heads = policy.config.num_attention_heads
    assert os.environ[FORCE_GQA_ENV] == "0" and sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)


def test_the_trainer_hands_sdpa_grouped_heads_on_a_cpu_without_checkpointing(tiny_model_dir, tmp_path):
    from conftest import FIXTURES
    from rlhf.cli import ALGORITHM_DEFAULTS
    from rlhf.config import RLConfig
    from rlhf.trainer import RLTrainer

    def built(**extra):
        return RLTrainer(RLConfig(**{
            **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir),
            "output_dir": str(tmp_path / str(len(extra))), "max_steps": 1, "rollout_batch_size": 2,
            "num_generations": 2, "mini_batch_size": 4, "max_new_tokens": 4, "max_prompt_length": 64, "lora_r": 4,
            "lora_alpha": 8, "save_steps": 0, "num_samples_to_log": 0,
            "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"], **extra})).model

    assert built().grouped_heads_in_sdpa
    assert not built(gradient_checkpointing=True).grouped_heads_in_sdpa


def test_layers_in_torchs_checkpoint_wrapper_keep_transformers_choice(tiny_model_dir, sdpa_calls):
    """accelerate's FSDP activation checkpointing and hand-made wrappers use torch's
    ``checkpoint_wrapper``: the layer's forward runs again in the backward, outside the switch."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = _trained_lora(tiny_model_dir)
    apply_activation_checkpointing(
        policy, checkpoint_wrapper_fn=lambda module: checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: isinstance(module, LlamaDecoderLayer))
    _, grads = _logprobs_and_grads(PolicyWithValue(policy, None, grouped_heads_in_sdpa=True), _batch())
    heads = policy.config.num_attention_heads
    assert grads and sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)


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
    model = PolicyWithValue(policy, None, grouped_heads_in_sdpa=True)
    logprobs, grads = _logprobs_and_grads(model, _batch())
    heads = policy.config.num_attention_heads
    assert grads and sdpa_calls and all(call == (heads, heads, False) for call in sdpa_calls)
