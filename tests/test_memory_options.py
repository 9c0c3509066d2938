"""Memory and precision options: generation_batch_size, logprob_batch_size, gradient checkpointing
with LoRA, bf16. Each must leave the numbers unchanged (up to float rounding) or be refused.
The script runs call train_ppo.py in this process (run_here)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_args
from rlhf.errors import ConfigError
from rlhf.models import PolicyWithValue, ValueHead, add_lora, check_bf16, load_base_model, load_tokenizer, update_mode
from rlhf.rollout import concat_rollouts, forward_response, generate_rollout

PROMPTS = ["Say hi.", "Tell me a long story about a dragon and a knight.", "Why?", "Name three colours, please.",
           "Write a haiku about the sea.", "Ok"]


def seeded_rollout(policy, tokenizer, prompts, seeds, first=0):
    rows = list(range(first, first + len(prompts)))
    return generate_rollout(policy, tokenizer, prompts, prompts=prompts, group_ids=rows,
                            columns={"id": rows}, max_prompt_length=32, max_new_tokens=7,
                            temperature=1.0, top_p=1.0, row_seeds=seeds)


def test_rollout_generated_in_chunks_equals_one_batch(tiny_model_dir):
    """generation_batch_size: chunks re-padded by concat_rollouts give the same tokens, masks and
    logprobs as one batch (the per-row seeded sampler makes draws independent of the batch)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = PolicyWithValue(add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"]),
                            ValueHead(32)).eval()
    seeds = list(range(100, 100 + len(PROMPTS)))
    whole = seeded_rollout(model.policy, tokenizer, PROMPTS, seeds)
    chunks = concat_rollouts([seeded_rollout(model.policy, tokenizer, PROMPTS[i:i + 4], seeds[i:i + 4], first=i)
                              for i in (0, 4)], tokenizer.pad_token_id)
    assert chunks.completions == whole.completions and chunks.columns == whole.columns
    assert torch.equal(chunks.mask, whole.mask) and torch.equal(chunks.eos_found, whole.eos_found)
    assert torch.equal(chunks.response_ids, whole.response_ids)
    assert torch.equal(chunks.group_ids, whole.group_ids)
    with torch.no_grad():
        lp_whole, v_whole, _ = forward_response(model, whole, slice(None), 1.0)
        lp_chunks, v_chunks, _ = forward_response(model, chunks, slice(None), 1.0)
    mask = whole.mask.bool()
    assert torch.allclose(lp_whole[mask], lp_chunks[mask], atol=1e-5)
    assert torch.allclose(v_whole[mask], v_chunks[mask], atol=1e-5)
    # select() keeps padding, so a row's logprobs do not move either
    part = whole.select([1, 4])
    with torch.no_grad():
        lp_part, _, _ = forward_response(model, part, slice(None), 1.0)
    assert torch.equal(lp_part, lp_whole[[1, 4]]) and part.prompts == [PROMPTS[1], PROMPTS[4]]


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = load_base_model(str(tiny_model_dir))
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model = PolicyWithValue(add_lora(base, 4, 8, 0.0, ["all-linear"]), None)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so every lora_A gets a gradient too
                torch.nn.init.normal_(param, std=0.05)
        rollout = seeded_rollout(model.policy, tokenizer, PROMPTS, list(range(len(PROMPTS))))
        update_mode(model)  # as the update runs: the checkpointing layers keep training mode
        calls = []
        attention = model.policy.base_model.model.model.layers[0].self_attn
        handle = attention.register_forward_hook(lambda *args: calls.append(1))
        logprobs, _, _ = forward_response(model, rollout, slice(None), 1.0)
        (logprobs * rollout.mask).sum().backward()
        handle.remove()
        assert len(calls) == (2 if checkpointing else 1)  # a checkpointed layer runs again in the backward
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert model.policy.base_model.model.model.gradient_checkpointing is checkpointing
    assert grads[True].keys() == grads[False].keys()
    assert all(g.abs().sum() > 0 for g in grads[True].values())  # every LoRA layer got a gradient
    for name in grads[False]:
        assert torch.allclose(grads[True][name], grads[False][name], atol=1e-6), name


def test_memory_options_through_the_script(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    result = run_here("train_ppo.py", *tiny_args(
        tiny_model_dir, out, "--rollout_batch_size", "6", "--mini_batch_size", "6", "--generation_batch_size", "4",
        "--logprob_batch_size", "5", "--gradient_checkpointing", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["policy_loss"] is not None for row in rows)


def test_bf16_run_keeps_lora_and_head_in_float32(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--bf16", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["kl"] is not None and row["entropy"] is not None for row in rows)


def test_bf16_refused_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match="bf16 is not supported by Tesla V100.*--bf16 false"):
        check_bf16(torch.device("cuda", 0))
    check_bf16(torch.device("cpu"))  # CPUs run it (emulated where there is no native support)


@pytest.mark.parametrize("key", ["generation_batch_size", "logprob_batch_size"])
def test_batch_size_options_must_be_positive(tiny_model_dir, tmp_path, key, run_here):
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, tmp_path / "run", f"--{key}", "0"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {key} must be >= 1 or none (= automatic), got 0"
