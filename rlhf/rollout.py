"""Batched sampling and the logprob/value passes over a rollout."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.data import adds_special_tokens
from rlhf.kv_cache import (decode_steps_take_attention_mask, forward_returns_cache, kv_cache_bytes, preallocated,
                            rows_selectable)
from rlhf.models import PolicyWithValue, checkpoints_layers, shared_prompt_cache, stop_token_ids
from rlhf.sampled_products import SampledProducts, replayable_modules


@dataclass
class Rollout:
    """One batch of sampled responses on this process. B sequences, prompt P, response T tokens."""

    input_ids: Tensor            # [B, P+T] left-padded prompt + right-padded response
    attention_mask: Tensor       # [B, P+T] 1 on real prompt tokens and real response tokens
    response_ids: Tensor         # [B, T] response tokens, pad after the first stop token (EOS)
    mask: Tensor                 # [B, T] float, 1 on response tokens up to and including the first EOS
    eos_found: Tensor            # [B] bool, the response ended with a stop token (not cut at max_new_tokens)
    group_ids: Tensor            # [B] long, index of the prompt each sequence answers
    prompts: list[Any]           # the dataset's prompt per sequence: a string or chat messages (rewards' `prompts`)
    completions: list[str]       # decoded response before its stop token (what rewards score)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # other dataset columns per sequence
    # [B, T] float32: the sampler's logprob of each response token under the distribution it drew
    # from (temperature, top-p renormalised), 0 on padding; None where no sampler gave them.
    sampler_logprobs: Tensor | None = None
    # Multi-turn episodes (rlhf.episodes): the response is the whole episode after the prompt,
    # sampled turns and the tool/environment tokens between them. ``mask`` is then 1 on sampled
    # tokens only (the actions: loss, KL, advantages) and ``episode_mask`` 1 on every episode token
    # (what attention sees). None for one-turn responses, where the two are the same.
    episode_mask: Tensor | None = None
    turn_rewards: Tensor | None = None  # [B, T] float32: each turn's environment reward on its last sampled token
    episodes: list[Any] | None = None  # rlhf.episodes.Episode per row (turns, tool calls; for metrics and logs)
    environments: list[Any] | None = None  # the environment instance per row (reward functions' ``environments``)
    # the sampler's products (rlhf.sampled_products.SampledProducts) and each row's index in them
    # (None: row i is its row i); a forward at the sampling's weights takes them instead of multiplying
    sampled_products: Any = None
    product_rows: Tensor | None = None

    @property
    def span(self) -> Tensor:
        """[B, T] 1 on every token after the prompt that belongs to the row (sampled or tool tokens)."""
        return self.mask if self.episode_mask is None else self.episode_mask

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    @property
    def position_ids(self) -> Tensor:
        # Left padding shifts every prompt; positions must count real tokens only (RL_NOTES 3).
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def sampled(self, index: Tensor | slice) -> tuple[Any, Tensor] | None:
        """(the sampler's products, the indices of rows ``index`` in them) for ``PolicyWithValue``, or None."""
        if self.sampled_products is None:
            return None
        rows = self.product_rows if self.product_rows is not None else torch.arange(len(self), device=self.mask.device)
        return self.sampled_products, rows[index]

    def select(self, rows: list[int]) -> "Rollout":
        """The given rows, with the batch's padding kept (so their logprobs do not change)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        return Rollout(
            input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
            response_ids=self.response_ids[index], mask=self.mask[index], eos_found=self.eos_found[index],
            group_ids=self.group_ids[index], prompts=[self.prompts[i] for i in rows],
            completions=[self.completions[i] for i in rows],
            columns={name: [values[i] for i in rows] for name, values in self.columns.items()},
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs[index],
            episode_mask=None if self.episode_mask is None else self.episode_mask[index],
            turn_rewards=None if self.turn_rewards is None else self.turn_rewards[index],
            episodes=None if self.episodes is None else [self.episodes[i] for i in rows],
            environments=None if self.environments is None else [self.environments[i] for i in rows],
            **_products_of(self, index),
        )

    def narrowed(self, rows: Tensor) -> tuple["Rollout", int]:
        """Rows ``rows`` without the columns that are padding in all of them: prompt columns no
        row uses on the left, response columns after the longest response on the right.

        Returns (that rollout, its response width t): its logprobs equal columns [:t] of the full
        rows' (causal attention never looks right; left padding is masked and positions count real
        tokens), so the update pays for no all-padding column. Scoring columns stay as they are.
        """
        width = max(int(self.span[rows].sum(-1).max()), 1)  # an episode's tokens are contiguous from 0
        prompt_length = self.input_ids.shape[1] - self.response_length
        used = self.attention_mask[rows, :prompt_length].bool().any(0).nonzero()
        # keep at least the last prompt column: its logits predict the first response token
        first = min(int(used[0]), prompt_length - 1) if len(used) else prompt_length - 1
        columns = slice(first, prompt_length + width)
        return Rollout(
            input_ids=self.input_ids[rows, columns], attention_mask=self.attention_mask[rows, columns],
            response_ids=self.response_ids[rows, :width], mask=self.mask[rows, :width], eos_found=self.eos_found[rows],
            group_ids=self.group_ids[rows], prompts=[self.prompts[i] for i in rows.tolist()],
            completions=[self.completions[i] for i in rows.tolist()], columns={},
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs[rows, :width],
            episode_mask=None if self.episode_mask is None else self.episode_mask[rows, :width],
            turn_rewards=None if self.turn_rewards is None else self.turn_rewards[rows, :width],
            **_products_of(self, rows),
        ), width


def _products_of(rollout: Rollout, rows: Tensor) -> dict[str, Any]:
    """The sampled-products fields of a rollout of ``rollout``'s rows ``rows``."""
    sampled = rollout.sampled(rows)
    return {} if sampled is None else {"sampled_products": sampled[0], "product_rows": sampled[1]}


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts generated in chunks: prompts are re-padded on the left to the widest chunk,
    responses on the right to the longest one (padding is masked everywhere)."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.input_ids.shape[1] - p.response_length for p in parts)
    response_width = max(p.response_length for p in parts)

    def pad(tensor: Tensor, left: int, right: int, value: float) -> Tensor:
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    input_ids, attention, responses, masks = [], [], [], []
    for part in parts:
        prompt_len = part.input_ids.shape[1] - part.response_length
        left, right = prompt_width - prompt_len, response_width - part.response_length
        input_ids.append(pad(part.input_ids, left, right, pad_token_id))
        attention.append(pad(part.attention_mask, left, right, 0))
        responses.append(pad(part.response_ids, 0, right, pad_token_id))
        masks.append(pad(part.mask, 0, right, 0.0))
    # One chunk without sampler logprobs (none are mixed in practice) leaves the batch without them.
    def stacked(name: str) -> Tensor | None:  # a [B, T] field, right-padded with zeros
        if any(getattr(p, name) is None for p in parts):
            return None
        return torch.cat([pad(getattr(p, name), 0, response_width - p.response_length, 0.0) for p in parts])

    def joined(name: str) -> list[Any] | None:
        return None if any(getattr(p, name) is None for p in parts) else [v for p in parts for v in getattr(p, name)]
    return Rollout(
        input_ids=torch.cat(input_ids), attention_mask=torch.cat(attention), response_ids=torch.cat(responses),
        mask=torch.cat(masks), eos_found=torch.cat([p.eos_found for p in parts]),
        group_ids=torch.cat([p.group_ids for p in parts]), prompts=[t for p in parts for t in p.prompts],
        completions=[t for p in parts for t in p.completions],
        columns={name: [v for p in parts for v in p.columns[name]] for name in parts[0].columns},
        sampler_logprobs=stacked("sampler_logprobs"), episode_mask=stacked("episode_mask"),
        turn_rewards=stacked("turn_rewards"), episodes=joined("episodes"), environments=joined("environments"),
    )


def response_mask(response_ids: Tensor, eos_token_ids: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mask of real response tokens: everything up to and including the first stop token.

    response_ids: [B, T] -> (mask [B, T] float, eos_found [B] bool). ``eos_token_ids``: one id or
    the model's stop set (rlhf.models.stop_token_ids). Rows without a stop token keep all T tokens
    (they were truncated by max_new_tokens). Anything after the first stop token is outside the
    mask, so a pad id that is itself a stop id (pad == EOS) changes nothing.
    """
    stops = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    is_eos = torch.isin(response_ids, torch.tensor(stops, dtype=response_ids.dtype, device=response_ids.device))
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
    row_seeds: list[int] | None = None,
    synced_gpus: bool = False,
    share_prompt_prefix: bool = False,
    eos_token_ids: list[int] | None = None,
    fast_forward: Any = None,
    recorder: Any = None,
    row_offset: int = 0,
) -> Rollout:
    """Sample one response per entry of ``prompt_texts`` (already chat-formatted) with KV cache.

    A response ends at the first of ``eos_token_ids`` (the model's stop set,
    rlhf.models.stop_token_ids; None = read it off ``policy``); its completion is the text before
    that token.

    Sampling is ``sample_responses`` (full vocabulary, no top-k: the distribution the loss
    assumes); with ``row_seeds`` (one per row) a row's response does not depend on the batch it is
    in (evaluation). With ``share_prompt_prefix`` a prompt that several rows share (a GRPO group)
    is prefilled once and its KV cache copied to those rows. Under FSDP2 (``synced_gpus``)
    transformers' ``generate`` runs instead, drawing from the same distribution (``SampledLogprobs``).
    Either way the rollout carries the sampler's logprob of each response token (``sampler_logprobs``).
    ``fast_forward``: a ``rlhf.sampling_forward.SamplingForward`` of ``policy``, run in its place;
    ``recorder``, ``row_offset``: see ``sample_responses``.
    """
    device = next(policy.parameters()).device
    stops = eos_token_ids if eos_token_ids is not None else stop_token_ids(policy, tokenizer)
    tokenizer.truncation_side = "left"  # a BOS stays first: truncation cuts the text, then adds it
    encoded = tokenizer(
        prompt_texts, padding=True, truncation=True, max_length=max_prompt_length,
        add_special_tokens=adds_special_tokens(tokenizer), return_tensors="pt",
    ).to(device)
    if not forward_returns_cache(policy):
        # The model keeps its state (RecurrentGemma) or returns it under its own name (RWKV): its own
        # prepare_inputs_for_generation steps it, one row at a time (RWKV's batched steps are wrong
        # in transformers 5: logprobs off by up to 1.9 against its forward at 2 rows). Under FSDP2
        # every process has as many rows, so as many synced generate calls.
        response_ids, sampler_logprobs = _generate_row_by_row(
            policy, encoded["input_ids"], encoded["attention_mask"], row_seeds, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, pad_token_id=tokenizer.pad_token_id, stops=stops,
            synced_gpus=synced_gpus)
    elif synced_gpus and row_seeds is None:  # FSDP2: every process must run as many forwards; generate() syncs them
        response_ids, sampler_logprobs = _generate(
            policy, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, pad_token_id=tokenizer.pad_token_id, stops=stops, synced_gpus=True)
    else:
        response_ids, sampler_logprobs = sample_responses(
            policy, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, eos_token_ids=stops, pad_token_id=tokenizer.pad_token_id,
            row_seeds=row_seeds, share_prompt_prefix=share_prompt_prefix, fast_forward=fast_forward,
            recorder=recorder, row_offset=row_offset)
    mask, eos_found = response_mask(response_ids, stops)
    # Drop columns where every row is already finished, so later passes do not pay for them.
    length = max(int(mask.sum(1).max().item()), 1)
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)[:, :length]
    mask = mask[:, :length]
    # where, not * mask: generate's recorder gives a pad outside the top-p nucleus -inf (and -inf * 0 is NaN)
    sampler_logprobs = torch.where(mask.bool(), sampler_logprobs[:, :length], 0.0)
    # The stop token itself is left out: a turn-end token need not be special (skip_special_tokens).
    completions = tokenizer.batch_decode(
        [row[: int(m.sum()) - int(ended)] for row, m, ended in zip(response_ids, mask, eos_found)],
        skip_special_tokens=True,
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
        sampler_logprobs=sampler_logprobs,
    )


# generate's logits processors and warpers, each at the value that leaves the scores alone: a
# model's generation_config (repetition_penalty, suppress_tokens, min_new_tokens, ...) would
# otherwise change the distribution drawn from, and the recorder would record that one.
_PLAIN_SAMPLING = dict(
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, min_length=0, min_new_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
    exponential_decay_length_penalty=None, suppress_tokens=None, begin_suppress_tokens=None, sequence_bias=None,
    guidance_scale=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, min_p=None, top_h=None,
    renormalize_logits=False, num_beams=1, num_return_sequences=1, penalty_alpha=None, dola_layers=None,
    watermarking_config=None, remove_invalid_values=False,
    # and what would change what generate returns or needs: a dict, a tokenizer, a draft model
    return_dict_in_generate=False, stop_strings=None, prompt_lookup_num_tokens=None,
)


def _generate(policy: Any, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, temperature: float,
              top_p: float, pad_token_id: int, stops: list[int], synced_gpus: bool) -> tuple[Tensor, Tensor]:
    """transformers' ``generate`` drawing from ``sample_responses``' distribution -> (response ids
    [B, T], their logprobs [B, T]; after a row's end whatever the recorder saw: callers mask).
    Temperature and top-p are applied by the recorder (as ``draw`` applies them), so generate adds
    no warper of its own (top_k=0: its default of 50 would change the distribution), and none of
    the model's generation_config processors (``_PLAIN_SAMPLING``)."""
    from transformers import GenerationConfig

    known = vars(GenerationConfig())
    plain = {key: value for key, value in _PLAIN_SAMPLING.items() if key in known}
    recorder = SampledLogprobs(temperature, top_p)
    sequences = policy.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
        temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, logits_processor=[recorder],
        pad_token_id=pad_token_id, eos_token_id=stops, use_cache=True, synced_gpus=synced_gpus, **plain,
    )
    response_ids = sequences[:, input_ids.shape[1]:]
    return response_ids, recorder.logprobs(response_ids)


def _generate_row_by_row(policy: Any, input_ids: Tensor, attention_mask: Tensor, row_seeds: list[int] | None, *,
                         max_new_tokens: int, temperature: float, top_p: float, pad_token_id: int,
                         stops: list[int], synced_gpus: bool = False) -> tuple[Tensor, Tensor]:
    """``_generate`` one row at a time. With ``row_seeds`` each row draws from
    ``torch.manual_seed(row_seeds[i])``, so its response does not depend on the rows beside it
    (as ``row_seeds`` in ``sample_responses``), and the global RNG is left as it was; without,
    the rows draw from the global RNG in turn. A row keeps its batch's left padding, which the
    passes that score it see too (a model whose recurrence takes pads in would otherwise be scored
    on another input). -> [B, T] ids (pad after a row's end) and logprobs (0 there)."""
    rows = []
    device = input_ids.device
    for index, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        with contextlib.ExitStack() as seeded:
            if row_seeds is not None:
                seeded.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
                torch.manual_seed(int(row_seeds[index]))
            rows.append(_generate(policy, ids.unsqueeze(0), mask.unsqueeze(0), max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, pad_token_id=pad_token_id, stops=stops,
                                  synced_gpus=synced_gpus))
    length = max(ids.shape[1] for ids, _ in rows)
    response_ids = torch.stack([F.pad(ids[0], (0, length - ids.shape[1]), value=pad_token_id) for ids, _ in rows])
    logprobs = torch.stack([F.pad(lp[0], (0, length - lp.shape[1]), value=0.0) for _, lp in rows])
    return response_ids, logprobs


def inverse_cdf_sample(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Token i of each row with cdf[i-1] <= u * total < cdf[i], i.e. drawn from probs / total.

    probs: [B, V] non-negative (need not sum to 1: top-p zeroes some); uniforms: [B] in [0, 1)
    -> tokens [B] long. The strict inequality on the right (searchsorted's right side) means a
    token with zero probability is never drawn, also at u = 0 where the left side would pick
    token 0; the draw is kept below the total so rounding cannot step past the last token with mass.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    draw = torch.minimum(uniforms.to(cdf.dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, draw, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_responses(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int,
    row_seeds: list[int] | None = None,
    share_prompt_prefix: bool = False,
    fast_forward: Any = None,
    compact_finished_rows: bool = True,
    recorder: Any = None,
    row_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Batched KV-cache sampling by inverse CDF: token t of row i is the first token whose
    cumulative probability reaches u[i, t] ~ U(0, 1).

    input_ids, attention_mask: [B, P] left-padded prompts -> (response ids [B, T<=max_new_tokens],
    pad after a row's first stop token (any of ``eos_token_ids``); logprobs [B, T] float32 of each
    drawn token under the distribution it was drawn from, temperature-scaled and renormalised over
    the top-p nucleus, read off the logits already at hand (no extra forward); 0 on padding and
    for greedy picks). Stops once every row has ended. temperature 0 = greedy. u comes from the
    global torch RNG, or with ``row_seeds`` from ``torch.Generator().manual_seed(row_seeds[i])``
    per row, so batch size, batch order and the process a row runs on do not change its response
    (up to float rounding of the logits; evaluation). One uniform per token instead of
    ``torch.multinomial``'s vocabulary-sized exponential draw; with ``share_prompt_prefix`` rows
    with the same prompt prefill it once (rlhf.models.shared_prompt_cache). The KV cache is
    written in place after the first step (rlhf.kv_cache.preallocated). ``fast_forward`` (a
    ``rlhf.sampling_forward.SamplingForward`` of ``model``: the same logits without the module
    stack) runs every forward in place of ``model``. ``compact_finished_rows``: once an eighth of
    the rows being decoded have ended, they leave the batch and its KV cache (``rows_to_keep``), so
    the rest decode at the cost of the rows still running. A row's numbers stay those of the full
    batch up to float rounding: with two or more threads PyTorch's CPU attention splits its work by
    the batch's size, so a row's logits already move in the last bits with the rows beside it.
    ``recorder`` (a ``rlhf.sampled_products.SampledProducts``, with ``fast_forward``): each step's
    products are kept there, these rows being its rows ``row_offset`` on.
    """
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    if row_seeds is None:
        uniforms = torch.rand(batch, max_new_tokens)
    else:
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(seed)))
                                for seed in row_seeds])
    uniforms = uniforms.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    forward = fast_forward if fast_forward is not None else model
    recording = recorder is not None and fast_forward is not None
    if recording:
        fast_forward.recorder = recorder
    prefix = prompt_length - 1
    if recording:
        recorder.sampled_prompts(row_offset, input_ids[:, :prefix], attention_mask[:, :prefix])
    with (recorder.writing_prefix(row_offset, input_ids[:, :prefix], attention_mask[:, :prefix])
          if recording and share_prompt_prefix and prefix > 0 else contextlib.nullcontext()):
        cache = (shared_prompt_cache(forward, input_ids, attention_mask, position_ids, prefix)
                 if share_prompt_prefix else None)
    step_ids, step_positions = (input_ids[:, -1:], position_ids[:, -1:]) if cache is not None else (input_ids, position_ids)
    tokens, logprobs = [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    live = torch.arange(batch, device=device)  # the rows still decoded, in cache order
    stops = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids), device=device)
    # Mask of every position the response can reach, read as a growing view (no per-token copy).
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
    decode_mask = decode_steps_take_attention_mask(model)
    for t in range(max_new_tokens):
        step_mask = full_mask[:, :prompt_length + t] if cache is None or decode_mask else None
        with (recorder.writing(slice(row_offset, row_offset + batch) if live.shape[0] == batch else live + row_offset,
                               t, step_ids[:, -1]) if recording else contextlib.nullcontext()):
            outputs = forward(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions,
                              cache=cache, use_cache=True, logits_to_keep=1)
        # at most max_new_tokens - 1 more columns: sliding-window layers that stay below their window qualify
        cache = preallocated(outputs.cache, max_new_tokens, bounded=True) if t == 0 else outputs.cache
        drawn, drawn_logprob = draw(outputs.logits[:, -1].float(), uniforms[:, t], temperature, top_p)
        token = torch.full((batch,), pad_token_id, dtype=drawn.dtype, device=device).index_copy_(0, live, drawn)
        logprob = drawn_logprob.new_zeros(batch).index_copy_(0, live, drawn_logprob)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logprobs.append(logprob.masked_fill(finished, 0.0))
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            break
        step_ids = token[live].unsqueeze(-1)
        step_positions = step_positions[:, -1:] + 1
        if compact_finished_rows and t + 1 < max_new_tokens:
            keep = rows_to_keep(finished[live])
            if keep is not None and rows_selectable(cache):
                cache.batch_select_indices(keep)
                live, step_ids, step_positions = live[keep], step_ids[keep], step_positions[keep]
                full_mask, uniforms = full_mask[keep], uniforms[keep]
    if recording:
        fast_forward.recorder = None
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


def rows_to_keep(finished: Tensor) -> Tensor | None:
    """Which rows of a decode batch stay in it, or None to keep them all.

    finished: [b] bool, the batch's rows that have ended -> indices into it, in order, of the rows
    still running, once at least an eighth of the batch has ended. Dropping rows copies the kept
    rows' KV cache, about what one decoding step reads of it, while each dropped row saves its share
    of every later step: cutting an eighth at a time pays back within about 15 steps even where
    reading the cache is all a step does (long contexts, large batches), and much sooner where
    reading the weights dominates (SmolLM2-135M, 16 rows, 200 cached tokens: 57.7 ms per step at 16
    rows, 51.3 at 12, 44.3 at 8, 35.2 at 4).
    """
    ended = int(finished.sum())
    if ended == 0 or ended < finished.shape[0] // 8:
        return None
    return (~finished).nonzero().squeeze(-1)


def draw(logits: Tensor, uniforms: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """Tokens [b] and their logprobs [b] from logits [b, V] and uniforms [b] in [0, 1): temperature,
    the top-p nucleus renormalised, inverse CDF; greedy at temperature 0, with logprob 0 (a greedy
    pick is certain). The one draw of every sampler here (responses and multi-turn episodes)."""
    if temperature == 0:
        return logits.argmax(-1), torch.zeros_like(logits[:, 0])
    # x / 1.0 is x bitwise: the division's [b, V] pass and copy only where it changes something
    scaled = logits / temperature if temperature != 1.0 else logits
    probs = nucleus(torch.softmax(scaled, dim=-1), top_p)
    token = inverse_cdf_sample(probs, uniforms)
    return token, nucleus_logprob(scaled, probs, token, top_p)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """probs [B, V] with the tokens outside the top-p nucleus zeroed (not renormalised).

    The nucleus is the most probable tokens whose mass before each reaches at most top_p, so the
    top token always stays (Holtzman et al. 2020); top_p 1 returns probs as they are."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def nucleus_logprob(scaled: Tensor, kept: Tensor, token: Tensor, top_p: float) -> Tensor:
    """Logprob [B] of ``token`` under the distribution drawn from: softmax(scaled) restricted to the
    nucleus and renormalised, log p = scaled[token] - logsumexp(scaled) - log(sum of kept probs).

    scaled: [B, V] logits / temperature; kept: [B, V] = nucleus(softmax(scaled)); token: [B] long.
    Taken from the logits, not log(kept[token]), so a rare token keeps its float32 precision; at
    top_p 1 it is exactly the trainer's log_softmax formula (no renormalisation term)."""
    logprob = scaled.gather(-1, token.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
    return logprob - kept.sum(-1).log() if top_p < 1.0 else logprob


class SampledLogprobs:
    """A logits processor for transformers' ``generate`` (the FSDP2 path) that turns each step's
    scores into the distribution ``sample_responses`` draws from (temperature, top-p nucleus) and
    keeps it until the next step, whose input ends with the token drawn from it: so the logprob of
    every drawn token is recorded without holding T x [B, V] scores (``output_scores`` would).

    ``logprobs(response_ids)`` -> [B, T] after generate returned (the last token is read off the
    last distribution). Rows finished early get generate's pad token; those columns are masked.
    """

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.previous: Tensor | None = None  # [B, V] log-distribution of the latest step
        self.recorded: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.recorded.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        scaled = scores.float() / self.temperature
        kept = nucleus(torch.softmax(scaled, dim=-1), self.top_p)
        log_dist = torch.log_softmax(scaled, dim=-1)
        if self.top_p < 1.0:  # renormalised over the nucleus; -inf outside, which generate never draws
            log_dist = (log_dist - kept.sum(-1, keepdim=True).log()).masked_fill(kept == 0, -math.inf)
        self.previous = log_dist
        return log_dist

    def logprobs(self, response_ids: Tensor) -> Tensor:
        steps = list(self.recorded)
        if self.previous is not None and len(steps) < response_ids.shape[1]:
            steps.append(self.previous.gather(-1, response_ids[:, len(steps)].unsqueeze(-1)).squeeze(-1))
        if not steps:
            return torch.zeros(response_ids.shape, device=response_ids.device)
        return torch.stack(steps, dim=1)


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
    return model(
        input_ids=rollout.input_ids[index],
        attention_mask=rollout.attention_mask[index],
        position_ids=rollout.position_ids[index],
        response_length=rollout.response_length,
        labels=rollout.response_ids[index],
        temperature=temperature,
        with_entropy=with_entropy,
        sampled=rollout.sampled(index),
    )


@contextlib.contextmanager
def sampling_speedups(policy: torch.nn.Module, enabled: bool = True, reserve_bytes: int = 0,
                      columns: int | None = None) -> Iterator[tuple[torch.nn.Module, Any]]:
    """``(model, fast_forward)`` to sample from ``policy`` with: its LoRA folded into the weights
    (rlhf.models.merged_lora_weights), this machine's faster linear products
    (rlhf.models.inference_linears) and, for the models it is exact for, the forward without the
    module stack (rlhf.sampling_forward; else None). The same distribution up to float rounding;
    ``enabled=False`` (DeepSpeed/FSDP own the tensors): ``(policy, None)``. Each weight copy is made
    only where free memory holds it twice over plus ``reserve_bytes``: the KV cache the sampling
    will fill (``rlhf.kv_cache.kv_cache_bytes``), which the copies must not crowd out.

    Where the sampler's forward runs every step (``columns``: the longest sequence, prompt and
    response; None: unknown) and oneDNN takes this machine's products, the LoRA is folded into
    that forward's own packed weights instead (``sampling_forward(fold=True)``) and the model is
    left as it is: one copy of the weights while sampling instead of two (RSS at the end of a
    32-token GRPO rollout of the benchmark's shape: SmolLM2-135M 2.54 -> 2.13 GB, a random model
    of Qwen3-0.6B's shape 7.41 -> 5.76 GB; the update's own peak, 2.95 and 7.85 GB, is unchanged)."""
    from rlhf.cpu_linear import use_onednn
    from rlhf.models import inference_linears, merged_lora_weights
    from rlhf.sampling_forward import sampling_forward

    if not enabled:
        yield policy, None
        return
    if use_onednn():
        with inference_linears(policy, reserve_bytes):
            folding_forward = sampling_forward(policy, fuse=True, reserve_bytes=reserve_bytes, fold=True,
                                               columns=columns)
            if folding_forward is not None:
                yield policy, folding_forward
                return
    with merged_lora_weights(policy, reserve_bytes) as folded, inference_linears(folded, reserve_bytes):
        yield folded, sampling_forward(folded, fuse=True, reserve_bytes=reserve_bytes)


def sampling_cache_bytes(model: torch.nn.Module, rows: int, max_prompt_length: int, max_new_tokens: int,
                         episodes: bool) -> int:
    """The KV cache a chunk of ``rows`` samples may fill, prompt and response at their caps. A
    multi-turn episode's cache can grow past that: each step left-pads every row to the widest
    tokens fed that step (tool results arrive at different steps) and a full buffer is re-seated
    at twice its size, so episodes count twice (a reviewer measured 2.08x the single-response
    figure for 6 rows with 3 staggered tool calls each)."""
    return (2 if episodes else 1) * kv_cache_bytes(model, rows, max_prompt_length + max_new_tokens)


def sample_rollout(model: torch.nn.Module, accelerator: Any, tokenizer: Any, dataset: Any, indices: list[int],
                   config: Any, num_generations: int, group_offset: int = 0,
                   eos_token_ids: list[int] | None = None, episodes: Any = None) -> Rollout:
    """num_generations responses to each of ``dataset``'s rows ``indices`` from the prepared model,
    in chunks of generation_batch_size; group ids start at group_offset (this process's first
    prompt in the global batch). The other dataset columns travel along for the reward functions.
    ``eos_token_ids``: the model's stop set (rlhf.models.stop_token_ids; None = read off the model).
    ``episodes``: a rlhf.episodes.ToolEpisodes; each response is then a multi-turn episode with
    tool calls (max_new_tokens bounds the whole episode), sampled token-exact with one KV cache."""
    from rlhf.data import format_prompt
    from rlhf.distributed import needs_synced_generation, shards_weights, unwrapped_full_weights

    rows = dataset.select(indices)
    raw_prompts = [p for p in rows[config.prompt_column] for _ in range(num_generations)]
    columns = {name: [v for v in rows[name] for _ in range(num_generations)]
               for name in rows.column_names if name != config.prompt_column}
    group_ids = [group_offset + i for i in range(len(indices)) for _ in range(num_generations)]
    chunk = config.generation_batch_size or len(raw_prompts)
    episode_rows = [dict(row) for row in rows for _ in range(num_generations)] if episodes is not None else []
    # Every row's environment is taken and reset now, for the whole batch: chunks sampled one after
    # another must not hand the same pooled instances out again before the batch is scored.
    started = episodes.start(episode_rows, config.prompt_column) if episodes is not None else None
    model.eval()
    parts = []
    with unwrapped_full_weights(model, accelerator) as plain:
        # not where DeepSpeed/FSDP own the tensors
        cache_bytes = sampling_cache_bytes(plain.policy, min(chunk, len(raw_prompts)), config.max_prompt_length,
                                           config.max_new_tokens, episodes is not None)
        longest = None if episodes is not None else config.max_prompt_length + config.max_new_tokens
        # probed here, on the model as it is, not on the sampling's folded copies (once per model)
        vocabulary = plain.chunked_vocabulary() if next(plain.policy.parameters()).device.type == "cpu" else 0
        with sampling_speedups(plain.policy, enabled=not shards_weights(accelerator), reserve_bytes=cache_bytes,
                               columns=longest) as (policy, fast_forward):
            # decided once the sampling's weight copies exist, which speed every token and come first;
            # kept only where a forward can take them: a group's rows share their prompt's prefix (the
            # update's forward after it is the one that takes them) and the sampler's forward runs every step.
            # Not for TRPO: its old logprobs would be the sampler's products, its surrogate and KL its own
            # forward's, and the conjugate-gradient step magnifies that rounding (a reviewer's Qwen2 shape:
            # step 1's KL after the step 6% apart, the step size 1.3%; 1e-5 of noise moved it by 2e-4)
            eligible = (episodes is None and num_generations > 1 and fast_forward is not None
                        and getattr(config, "update_method", None) != "trpo"
                        and fast_forward.runs_every_step(config.max_prompt_length + config.max_new_tokens))
            products_bytes = sampled_products_bytes(plain, len(raw_prompts), config.max_new_tokens, eligible,
                                                    cache_bytes)
            recorder = None
            if products_bytes:  # the projections both forwards compute
                # and the logits, where the update's logprobs take the chunked projection and memory holds them too
                if vocabulary and not sampled_products_bytes(plain, len(raw_prompts), config.max_new_tokens, eligible,
                                                             cache_bytes, vocabulary):
                    vocabulary = 0
                recorded = fast_forward.projection_modules()
                replayable = [module for module in replayable_modules(plain.policy) if module in recorded]
                # and the attentions' outputs, where q, k and v are kept and memory holds them too; not
                # with checkpointed layers, whose forward runs again in the backward, as its own
                checkpointed = checkpoints_layers(plain.policy)
                attentions = {attention: qkv for attention, qkv in fast_forward.attention_modules().items()
                              if not checkpointed and all(module in replayable for module in qkv)}
                if attentions and not sampled_products_bytes(
                        plain, len(raw_prompts), config.max_new_tokens, eligible, cache_bytes, vocabulary,
                        SampledProducts.attention_bytes(attentions, len(raw_prompts), config.max_new_tokens)):
                    attentions = {}
                recorder = SampledProducts(replayable, len(raw_prompts), config.max_new_tokens,
                                           next(plain.policy.parameters()).device, vocabulary, attentions,
                                           fast_forward.projection_groups())
            for start in range(0, len(raw_prompts), chunk):
                part = slice(start, start + chunk)
                if episodes is not None:
                    from rlhf.episodes.runner import sample_episode_rollout

                    parts.append(sample_episode_rollout(
                        episodes, policy, episode_rows[part],
                        prompt_column=config.prompt_column, group_ids=group_ids[part],
                        columns={name: values[part] for name, values in columns.items()},
                        max_completion_length=config.max_new_tokens, max_prompt_length=config.max_prompt_length,
                        temperature=config.temperature, top_p=config.top_p,
                        stop_ids=eos_token_ids if eos_token_ids is not None else stop_token_ids(policy, tokenizer),
                        share_prompt_prefix=plain.share_prompt_prefix,
                        started=(started[0][part], started[1][part], None if started[2] is None else started[2][part]),
                        fast_forward=fast_forward))
                    continue
                parts.append(generate_rollout(
                    policy, tokenizer, [format_prompt(p, tokenizer) for p in raw_prompts[part]],
                    prompts=raw_prompts[part], group_ids=group_ids[part],
                    columns={name: values[part] for name, values in columns.items()},
                    max_prompt_length=config.max_prompt_length, max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature, top_p=config.top_p,
                    synced_gpus=needs_synced_generation(accelerator), share_prompt_prefix=plain.share_prompt_prefix,
                    eos_token_ids=eos_token_ids, fast_forward=fast_forward, recorder=recorder, row_offset=start,
                ))
        rollout = concat_rollouts(parts, tokenizer.pad_token_id)
        if recorder is not None:  # the weights as sampling leaves them (its folded copies are gone)
            recorder.seal(plain.policy)
            rollout.sampled_products = recorder
    return rollout


def sampled_products_bytes(model: PolicyWithValue, rows: int, max_new_tokens: int, eligible: bool,
                           reserve_bytes: int = 0, vocabulary: int = 0, attention_bytes: int = 0) -> int:
    """Memory for the sampler's products of ``rows`` responses (``rlhf.sampled_products``; with
    their logits where ``vocabulary`` > 0, and ``attention_bytes`` more for attention outputs), or 0
    where they are not kept: not ``eligible`` (tool episodes, no sampler's forward), not on a CPU, no
    shared prompt prefix in the update's forward (the only forward that takes them), no layer that
    could take them, or more than a quarter of the memory free beyond ``reserve_bytes`` (the KV
    cache the sampling will fill)."""
    from rlhf.cpu_linear import memory_choice

    if not eligible or not model.share_prompt_prefix or next(model.policy.parameters()).device.type != "cpu":
        return 0
    needed = SampledProducts.bytes_needed(model.policy, rows, max_new_tokens, vocabulary) + attention_bytes
    if needed <= 0:
        return 0
    kept = "attention outputs" if attention_bytes else "logits" if vocabulary else "products"
    return needed if memory_choice(f"sampler's {kept} kept for the update",
                                   lambda memory: needed <= (memory - reserve_bytes) // 4) else 0
