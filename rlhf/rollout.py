"""Batched sampling and the logprob/value passes over a rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlhf.algorithms import entropy_from_logits, logprobs_from_logits
from rlhf.models import PolicyWithValue


@dataclass
class Rollout:
    """One batch of sampled responses on this process. B sequences, prompt P, response T tokens."""

    input_ids: Tensor            # [B, P+T] left-padded prompt + right-padded response
    attention_mask: Tensor       # [B, P+T] 1 on real prompt tokens and real response tokens
    response_ids: Tensor         # [B, T] response tokens, pad after the first EOS
    mask: Tensor                 # [B, T] float, 1 on response tokens up to and including the first EOS
    eos_found: Tensor            # [B] bool, the response ended with EOS (not cut at max_new_tokens)
    group_ids: Tensor            # [B] long, index of the prompt each sequence answers
    prompts: list[str]           # user text per sequence (reward functions' `prompts`)
    completions: list[str]       # decoded response up to EOS (what rewards score)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # other dataset columns per sequence

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    @property
    def position_ids(self) -> Tensor:
        # Left padding shifts every prompt; positions must count real tokens only (RL_NOTES 3).
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.response_ids.shape[0]


def response_mask(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Mask of real response tokens: everything up to and including the first EOS.

    response_ids: [B, T] -> (mask [B, T] float, eos_found [B] bool). Rows without an EOS keep
    all T tokens (they were truncated by max_new_tokens).
    """
    is_eos = response_ids == eos_token_id
    eos_found = is_eos.any(dim=1)
    # number of EOS tokens strictly before each position; 0 means "still inside the response"
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).float(), eos_found


@torch.no_grad()
def generate_rollout(
    policy: Any,
    tokenizer: Any,
    prompt_texts: list[str],
    *,
    prompts: list[str],
    group_ids: list[int],
    columns: dict[str, list[Any]],
    max_prompt_length: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> Rollout:
    """Sample one response per entry of ``prompt_texts`` (already chat-formatted) with KV cache.

    top_k is switched off explicitly: transformers defaults to top_k=50, which would silently
    sample from a different distribution than the one the loss assumes.
    """
    device = next(policy.parameters()).device
    tokenizer.truncation_side = "left"
    encoded = tokenizer(
        prompt_texts, padding=True, truncation=True, max_length=max_prompt_length,
        add_special_tokens=False, return_tensors="pt",
    ).to(device)
    prompt_length = encoded["input_ids"].shape[1]
    sequences = policy.generate(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    response_ids = sequences[:, prompt_length:]
    mask, eos_found = response_mask(response_ids, tokenizer.eos_token_id)
    # Drop columns where every row is already finished, so later passes do not pay for them.
    length = max(int(mask.sum(1).max().item()), 1)
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)[:, :length]
    mask = mask[:, :length]
    completions = tokenizer.batch_decode(
        [row[: int(m.sum())] for row, m in zip(response_ids, mask)], skip_special_tokens=True
    )
    return Rollout(
        input_ids=torch.cat([encoded["input_ids"], response_ids], dim=1),
        attention_mask=torch.cat([encoded["attention_mask"], mask.long()], dim=1),
        response_ids=response_ids,
        mask=mask,
        eos_found=eos_found,
        group_ids=torch.tensor(group_ids, device=device, dtype=torch.long),
        prompts=prompts,
        completions=completions,
        columns=columns,
    )


def forward_response(
    model: PolicyWithValue | Any,
    rollout: Rollout,
    index: Tensor | slice,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Logprobs (and values, entropy) of rows ``index`` of the rollout's response tokens.

    Returns logprobs [b, T] float32, values [b, T] | None, entropy [b, T] | None. Logits are divided
    by the sampling temperature in every pass (policy, old, reference), or KL drifts (RL_NOTES 2).
    """
    logits, values = model(
        input_ids=rollout.input_ids[index],
        attention_mask=rollout.attention_mask[index],
        position_ids=rollout.position_ids[index],
        response_length=rollout.response_length,
    )
    logits = logits / temperature
    logprobs = logprobs_from_logits(logits, rollout.response_ids[index])
    entropy = entropy_from_logits(logits.detach()) if with_entropy else None
    return logprobs, values, entropy
