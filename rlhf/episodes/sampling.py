"""Token-exact multi-turn episodes, sampled for a batch with one KV cache carried across turns.

An episode's tokens after the prompt are, in order: turn 1's sampled tokens (up to and including
its stop token), the tokens the chat template renders for that turn's tool results (glue: the
end-of-turn newline, the tool message, the next generation prompt), turn 2's sampled tokens, and
so on. Sampled tokens are never decoded and re-encoded: parsing a turn for its tool calls reads
them, but the episode keeps the ids the sampler drew, so the training sequence is the sampled one
(TRL's "Unexpected tokenization" / verl's token drift cannot happen).

Batching: every row feeds the model a right-aligned chunk per step, its last sampled token, or
after a turn that called tools that token plus the tool tokens; chunks are left-padded to the
widest, so a row never waits for the others' turns and the last column always holds each row's
next-token logits. Rows keep one cache whose columns are shared; padding columns are masked out
and positions count real tokens only (explicit ``position_ids``), so a row's logits are those of
its own sequence alone. A finished episode leaves the batch (``cache.batch_select_indices``).

That needs full attention in every layer. Hybrid models (LFM2, Qwen3.5, Qwen3-Next) carry
conv and recurrent state besides keys and values: a pad column in mid-sequence would enter that
state, and transformers cannot select its rows. A sliding window (Mistral, Gemma 3) counts columns,
pads included, so it would hold fewer of a row's real tokens. For these the cache is dropped and
every row's history prefilled again (left padding only before the sequence, where it changes
nothing) whenever a turn starts or an episode leaves; within a turn they decode one token per step
like any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlhf.episodes.chat import Messages, render_ids, tool_suffix_ids
from rlhf.episodes.tools import Toolbox, run_tool_calls
from rlhf.errors import ConfigError
from rlhf.kv_cache import carries_mid_sequence_padding, decode_steps_take_attention_mask, forward_returns_cache, preallocated
from rlhf.models import shared_prompt_cache
from rlhf.rollout import draw


@dataclass
class Episode:
    """One sampled episode. Indices are into ``completion_ids`` (the tokens after the prompt)."""

    prompt: Messages                 # the prompt's messages as rendered (reset observation included)
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)     # sampled turns and tool/glue tokens
    mask: list[int] = field(default_factory=list)               # 1 = sampled by the model, 0 = tool result / glue
    sampler_logprobs: list[float] = field(default_factory=list)  # logprob of each sampled token; 0.0 where mask 0
    turn_ends: list[int] = field(default_factory=list)          # index of each turn's last sampled token
    turn_rewards: list[float] = field(default_factory=list)     # per turn: sum of the rewards its tool calls returned
    messages: Messages = field(default_factory=list)            # TRL's conversational completion (assistant + tool)
    tool_calls: int = 0
    tool_failures: int = 0
    truncated: bool = False  # ended by max_completion_length: a turn cut short, or tool results that did not fit

    @property
    def turns(self) -> int:
        return len(self.turn_ends)


class _Row:
    """An episode being sampled, with what the loop needs besides the Episode."""

    def __init__(self, episode: Episode, toolbox: Toolbox):
        self.episode = episode
        self.toolbox = toolbox
        self.fed = 0                 # tokens of prompt + completion already in the KV cache
        self.turn_start = 0          # index in completion_ids where the current turn began
        self.tool_rounds = 0         # turns whose tool calls were executed
        self.sampled = 0             # tokens sampled so far (the index of the next one's uniform)
        self.done = False

    def length(self) -> int:
        return len(self.episode.prompt_ids) + len(self.episode.completion_ids)

    def unfed(self) -> list[int]:
        """The tokens of prompt + completion not yet in the KV cache."""
        prompt = self.episode.prompt_ids
        if self.fed < len(prompt):
            return prompt[self.fed:] + self.episode.completion_ids
        return self.episode.completion_ids[self.fed - len(prompt):]


def _parse_turn(tokenizer: Any, row: _Row) -> dict[str, Any]:
    """The current turn as an assistant message, by transformers' response parser (TRL's
    ``parse_response``: tool calls typed by the tools' schemas; malformed ones become plain text)."""
    from trl.chat_template_utils import parse_response

    episode = row.episode
    turn = episode.completion_ids[row.turn_start:]
    prefix = episode.prompt_ids + episode.completion_ids[:row.turn_start]
    return parse_response(tokenizer, turn, prefix=prefix, tools=row.toolbox.schemas or None)


def _end_turns(rows: list[_Row], hit_stop: list[bool], tokenizer: Any, *, max_completion_length: int,
               max_tool_calling_iterations: int | None, tool_timeout: float | None, chat_template: str | None,
               template_kwargs: dict[str, Any] | None, stop_ids: list[int]) -> None:
    """Close the current turn of each of ``rows``: parse it, run its tool calls (all rows' calls
    together), and either append the tool tokens (the row goes on) or mark the episode done.

    ``hit_stop[i]``: the turn ended with a stop token (False: the episode's budget ran out inside
    the turn; it is truncated and its calls are not run). Tool results whose tokens would leave no
    room for one more sampled token are dropped and the episode ends truncated (TRL rolls them back
    the same way); their calls still count, and their rewards stay with the turn.
    """
    calling: list[tuple[_Row, list[Any]]] = []
    for row, stopped in zip(rows, hit_stop):
        episode = row.episode
        message = _parse_turn(tokenizer, row)
        episode.messages.append(message)
        episode.turn_ends.append(len(episode.completion_ids) - 1)
        episode.turn_rewards.append(0.0)
        calls = message.get("tool_calls") or []
        limit_reached = max_tool_calling_iterations is not None and row.tool_rounds >= max_tool_calling_iterations
        if not stopped or not calls or limit_reached:
            episode.truncated = not stopped
            row.done = True
            continue
        calling.append((row, calls))
    outcomes = iter(run_tool_calls([(row.toolbox, call) for row, calls in calling for call in calls], tool_timeout))
    for row, calls in calling:
        episode = row.episode
        results = [next(outcomes) for _ in calls]
        row.tool_rounds += 1
        episode.tool_calls += len(results)
        episode.tool_failures += sum(r.failed for r in results)
        episode.turn_rewards[-1] += sum(r.reward for r in results)
        tool_messages = [{"role": "tool", "name": r.name, "content": r.content} for r in results]
        suffix = tool_suffix_ids(tokenizer, episode.prompt + episode.messages, tool_messages,
                                 tools=row.toolbox.schemas, chat_template=chat_template, stop_ids=stop_ids,
                                 template_kwargs=template_kwargs)
        if len(episode.completion_ids) + len(suffix) >= max_completion_length:
            episode.truncated = True
            row.done = True
            continue
        episode.messages.extend(tool_messages)
        episode.completion_ids.extend(suffix)
        episode.mask.extend([0] * len(suffix))
        episode.sampler_logprobs.extend([0.0] * len(suffix))
        row.turn_start = len(episode.completion_ids)


def _left_padded(chunks: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """ids [b, w] and mask [b, w] of right-aligned chunks (left padding: the last column is every
    row's latest token)."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        if chunk:
            ids[i, width - len(chunk):] = torch.tensor(chunk, dtype=torch.long)
            mask[i, width - len(chunk):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_episodes(
    model: Any,
    tokenizer: Any,
    prompts: list[Messages],
    toolboxes: list[Toolbox],
    *,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    stop_ids: list[int],
    pad_token_id: int,
    max_tool_calling_iterations: int | None = None,
    tool_timeout: float | None = None,
    chat_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    max_prompt_length: int | None = None,
    uniforms: Tensor | None = None,
    row_seeds: list[int] | None = None,
    share_prompt_prefix: bool = False,
    reprefill_each_turn: bool = False,
    fast_forward: Any = None,
) -> list[Episode]:
    """Sample one episode per prompt: turns of the model, tool calls executed between them.

    prompts: B conversations (the environment's reset observation already in); toolboxes: each
    row's tools (rlhf.episodes.tools.Toolbox). ``max_completion_length`` bounds every episode's
    tokens after the prompt, sampled and tool tokens together (TRL's meaning); a turn that reaches
    it ends the episode as truncated. ``max_tool_calling_iterations``: turns whose tool calls are
    executed (None: no limit); a later turn's calls end the episode unexecuted (TRL). A prompt
    longer than ``max_prompt_length`` loses its left end (rlhf.rollout does the same).

    Sampling is ``draw`` (rlhf.rollout's distribution); the n-th sampled token of row i uses
    ``uniforms[i, n]`` ([B, max_completion_length]; default: torch's global RNG, or one
    ``torch.Generator`` per row from ``row_seeds``), so a row's episode does not depend on the
    layout of the batch. With ``share_prompt_prefix`` a prompt several rows share (a GRPO group)
    is prefilled once (rlhf.models.shared_prompt_cache). ``reprefill_each_turn``: the slow
    reference that drops the cache and prefills every row's whole history whenever a turn starts
    (tests and timing only). ``fast_forward``: a ``rlhf.sampling_forward.SamplingForward`` of
    ``model`` (the same logits without the module stack), run in its place.

    Returns the episodes in prompt order (rlhf.episodes.sampling.Episode).
    """
    if not forward_returns_cache(model):
        raise ConfigError(f"{type(model).__name__} returns no cache from its forward (it keeps its state inside its "
                          "modules): multi-turn tool episodes need a model whose forward hands its cache back")
    device = next(model.parameters()).device
    forward = fast_forward if fast_forward is not None else model
    decode_mask = decode_steps_take_attention_mask(model)
    batch = len(prompts)
    if uniforms is None:
        uniforms = (torch.rand(batch, max_completion_length) if row_seeds is None else torch.stack(
            [torch.rand(max_completion_length, generator=torch.Generator().manual_seed(int(s))) for s in row_seeds]))
    uniforms = uniforms.to(device)
    stops = set(stop_ids)
    rows = []
    for prompt, toolbox in zip(prompts, toolboxes):
        ids = render_ids(tokenizer, prompt, tools=toolbox.schemas, chat_template=chat_template,
                         add_generation_prompt=True, template_kwargs=template_kwargs)
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        rows.append(_Row(Episode(prompt=prompt, prompt_ids=ids), toolbox))
    end_turns = dict(max_completion_length=max_completion_length, tool_timeout=tool_timeout,
                     max_tool_calling_iterations=max_tool_calling_iterations, chat_template=chat_template,
                     template_kwargs=template_kwargs, stop_ids=stop_ids)

    active = list(range(batch))      # rows in the batch, in cache order
    cache: Any = None
    attention = torch.zeros((batch, 0), dtype=torch.long, device=device)  # [b, columns] 1 on real tokens
    positions = torch.zeros(batch, dtype=torch.long, device=device)       # [b] real tokens in the cache
    if share_prompt_prefix:  # all but each prompt's last token, once per distinct prompt
        ids, prompt_mask = _left_padded([row.episode.prompt_ids for row in rows], pad_token_id, device)
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        cache = shared_prompt_cache(forward, ids, prompt_mask, prompt_positions, ids.shape[1] - 1)
        if cache is not None:
            attention, positions = prompt_mask[:, :-1], prompt_mask[:, :-1].sum(-1)
            for row in rows:
                row.fed = len(row.episode.prompt_ids) - 1
    first_step = True
    while active:
        chunks = [rows[r].unfed() for r in active]
        ids, chunk_mask = _left_padded(chunks, pad_token_id, device)
        attention = torch.cat([attention, chunk_mask], dim=1)
        # pads get the position of the row's next real token: they are masked as keys and their
        # outputs are never read, so any position would do
        chunk_positions = positions.unsqueeze(1) + (chunk_mask.cumsum(-1) - 1).clamp(min=0)
        # Mamba's decode steps take no mask (as in generate): they follow a prefill, one token per row
        outputs = forward(input_ids=ids, attention_mask=attention if cache is None or decode_mask else None,
                          position_ids=chunk_positions, cache=cache, use_cache=True, logits_to_keep=1)
        cache = preallocated(outputs.cache, max_completion_length) if first_step or cache is None else outputs.cache
        first_step = False
        # full attention only: the cache is carried across turns; other models prefill again (above)
        carries_cache = carries_mid_sequence_padding(cache)
        positions = positions + chunk_mask.sum(-1)
        for r in active:
            rows[r].fed = rows[r].length()
        index = torch.tensor(active, device=device)
        counts = torch.tensor([rows[r].sampled for r in active], device=device)
        tokens, logprobs = draw(outputs.logits[:, -1].float(), uniforms[index, counts], temperature, top_p)
        ended, hit_stop = [], []
        for r, token, logprob in zip(active, tokens.tolist(), logprobs.tolist()):
            episode = rows[r].episode
            episode.completion_ids.append(token)
            episode.mask.append(1)
            episode.sampler_logprobs.append(logprob)
            rows[r].sampled += 1
            if token in stops or len(episode.completion_ids) >= max_completion_length:
                ended.append(rows[r])
                hit_stop.append(token in stops)
        if ended:
            _end_turns(ended, hit_stop, tokenizer, **end_turns)
        keep = [j for j, r in enumerate(active) if not rows[r].done]
        left = len(keep) < len(active)
        if left:  # finished episodes leave the batch and cost nothing more
            active = [active[j] for j in keep]
            kept = torch.tensor(keep, device=device, dtype=torch.long)
            attention, positions = attention[kept], positions[kept]
            if keep and carries_cache:
                cache.batch_select_indices(kept)
        if active and ((left and not carries_cache) or ((reprefill_each_turn or not carries_cache) and any(
                rows[r].turn_start == len(rows[r].episode.completion_ids) for r in active))):
            cache, attention = None, attention[:, :0]
            positions = torch.zeros_like(positions)
            for r in active:
                rows[r].fed = 0
    return [row.episode for row in rows]


@dataclass
class EpisodeBatch:
    """Episodes as padded tensors in rlhf.rollout.Rollout's layout: B rows, prompt P, episode T."""

    input_ids: Tensor        # [B, P+T] left-padded prompt + right-padded episode tokens
    attention_mask: Tensor   # [B, P+T] 1 on prompt tokens and on every episode token (sampled and tool)
    response_ids: Tensor     # [B, T] episode tokens after the prompt, pad after the episode
    mask: Tensor             # [B, T] float, 1 on sampled tokens only: the loss mask
    episode_mask: Tensor     # [B, T] float, 1 on every episode token: attention, and the state for GAE
    sampler_logprobs: Tensor  # [B, T] float32, the sampler's logprob of each sampled token, 0 elsewhere
    token_rewards: Tensor    # [B, T] float32, each turn's reward on that turn's last sampled token
    eos_found: Tensor        # [B] bool, the episode ended by itself (not truncated)


def pack_episodes(episodes: list[Episode], pad_token_id: int, device: torch.device | str = "cpu") -> EpisodeBatch:
    """Stack episodes into an EpisodeBatch (prompts left-padded, episodes right-padded)."""
    prompt_width = max(len(e.prompt_ids) for e in episodes)
    width = max(max(len(e.completion_ids) for e in episodes), 1)
    batch = len(episodes)
    input_ids = torch.full((batch, prompt_width + width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, prompt_width + width), dtype=torch.long)
    mask, logprobs, rewards = (torch.zeros((batch, width)) for _ in range(3))
    for i, episode in enumerate(episodes):
        p, t = len(episode.prompt_ids), len(episode.completion_ids)
        input_ids[i, prompt_width - p:prompt_width] = torch.tensor(episode.prompt_ids, dtype=torch.long)
        input_ids[i, prompt_width:prompt_width + t] = torch.tensor(episode.completion_ids, dtype=torch.long)
        attention[i, prompt_width - p:prompt_width + t] = 1
        mask[i, :t] = torch.tensor(episode.mask, dtype=torch.float32)
        logprobs[i, :t] = torch.tensor(episode.sampler_logprobs, dtype=torch.float32)
        for end, reward in zip(episode.turn_ends, episode.turn_rewards):
            rewards[i, end] += reward
    return EpisodeBatch(
        input_ids=input_ids.to(device), attention_mask=attention.to(device),
        response_ids=input_ids[:, prompt_width:].to(device), mask=mask.to(device),
        episode_mask=attention[:, prompt_width:].float().to(device), sampler_logprobs=logprobs.to(device),
        token_rewards=rewards.to(device),
        eos_found=torch.tensor([not e.truncated for e in episodes], dtype=torch.bool, device=device),
    )


def episode_metrics(episodes: list[Episode], all_reduce: Any = None) -> dict[str, float]:
    """This batch's episode statistics (TRL's tool metric names): turns per episode, tool calls
    per episode (tools/call_frequency), failed calls per call (tools/failure_frequency), tokens
    per episode (all, and sampled only) and the share truncated. ``all_reduce``: sums a list of
    floats over processes (rlhf.distributed.Reducer.sum), so the ratios are global."""
    totals = [float(len(episodes)), float(sum(e.turns for e in episodes)), float(sum(e.tool_calls for e in episodes)),
              float(sum(e.tool_failures for e in episodes)), float(sum(len(e.completion_ids) for e in episodes)),
              float(sum(sum(e.mask) for e in episodes)), float(sum(e.truncated for e in episodes))]
    if all_reduce is not None:
        totals = [float(v) for v in all_reduce(totals)]
    count, turns, calls, failures, length, sampled, truncated = totals
    count = max(count, 1.0)
    return {
        "turns_mean": turns / count,
        "tools/call_frequency": calls / count,
        "tools/failure_frequency": failures / calls if calls else 0.0,
        "episode_length_mean": length / count,
        "episode_sampled_tokens_mean": sampled / count,
        "episodes_truncated": truncated / count,
    }
