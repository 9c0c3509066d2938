"""Rollout mechanics on the tiny model: masks, padding, position ids, logprob recomputation."""

from __future__ import annotations

import pytest
import torch

from rlhf.models import PolicyWithValue, ValueHead, add_lora, load_base_model, load_tokenizer
from rlhf.rollout import forward_response, generate_rollout, response_mask, sample_responses


def test_response_mask_stops_after_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask, eos_found = response_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert eos_found.tolist() == [True, False, True]


def test_tokenizer_pad_differs_from_eos(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def make_policy(model_dir, with_value=False):
    base = load_base_model(str(model_dir))
    policy = add_lora(base, 4, 8, 0.0, ["all-linear"])
    return PolicyWithValue(policy, ValueHead(base.config.hidden_size) if with_value else None)


def sample(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0):
    return generate_rollout(model.policy, tokenizer, prompts, prompts=prompts, group_ids=list(range(len(prompts))),
                            columns={}, max_prompt_length=32, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=1.0)


def test_left_padding_gives_same_logprobs_as_unpadded(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = make_policy(tiny_model_dir, with_value=True)
    prompts = ["Hi", "A much longer prompt with many more tokens in it"]
    rollout = sample(model, tokenizer, prompts)
    assert rollout.attention_mask[0, 0] == 0  # the short prompt is left-padded
    checked = 0
    with torch.no_grad():
        batched, values, _ = forward_response(model, rollout, slice(0, 2), temperature=0.7)
        for row in range(2):
            keep = rollout.attention_mask[row].bool()
            alone = type(rollout)(
                input_ids=rollout.input_ids[row:row + 1, keep], attention_mask=rollout.attention_mask[row:row + 1, keep],
                response_ids=rollout.response_ids[row:row + 1], mask=rollout.mask[row:row + 1],
                eos_found=rollout.eos_found[row:row + 1], group_ids=rollout.group_ids[row:row + 1],
                prompts=[prompts[row]], completions=[rollout.completions[row]],
            )
            if rollout.mask[row].all():
                single, _, _ = forward_response(model, alone, slice(0, 1), temperature=0.7)
                assert torch.allclose(single[0], batched[row], atol=1e-4)
                checked += 1
    assert checked >= 1  # the random tiny model practically never stops early
    assert values.shape == rollout.mask.shape


def test_recomputed_logprobs_use_the_sampling_temperature(tiny_model_dir):
    torch.manual_seed(1)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = make_policy(tiny_model_dir)
    rollout = sample(model, tokenizer, ["Hello", "Goodbye"], temperature=0.5)
    with torch.no_grad():
        at_half, _, _ = forward_response(model, rollout, slice(0, 2), temperature=0.5)
        at_one, _, _ = forward_response(model, rollout, slice(0, 2), temperature=1.0)
        logits, _, _ = model(rollout.input_ids, rollout.attention_mask, rollout.position_ids, rollout.response_length)
    manual = torch.log_softmax(logits / 0.5, -1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(at_half, manual, atol=1e-5)
    assert not torch.allclose(at_half, at_one)


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are always the same 5 numbers."""

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])

    def forward(self, input_ids, cache=None, **kwargs):
        from types import SimpleNamespace

        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, length, 5), cache=cache)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampler_draws_from_the_temperature_and_top_p_distribution(temperature, top_p):
    torch.manual_seed(0)
    rows = 20000
    tokens = sample_responses(FixedLogits(), torch.ones(rows, 3, dtype=torch.long), torch.ones(rows, 3, dtype=torch.long),
                              max_new_tokens=1, temperature=temperature, top_p=top_p, eos_token_ids=99,
                              pad_token_id=98)[0][:, 0]
    probs = torch.softmax(FixedLogits.logits / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) <= top_p
    expected = torch.zeros(5).scatter(0, order, sorted_probs * keep)
    expected = expected / expected.sum()
    observed = torch.bincount(tokens, minlength=5).float() / rows
    assert torch.allclose(observed, expected, atol=0.012), (observed, expected)  # ~4 standard errors
    if top_p < 1.0:
        assert observed[expected == 0].sum() == 0


def test_sampler_is_greedy_at_temperature_zero_and_stops_after_eos():
    ids = torch.ones(3, 2, dtype=torch.long)
    tokens, _ = sample_responses(FixedLogits(), ids, torch.ones_like(ids), max_new_tokens=4, temperature=0.0, top_p=1.0,
                                 eos_token_ids=0, pad_token_id=98)
    assert tokens.tolist() == [[0]] * 3  # token 0 is the argmax and EOS: every row ends at once
