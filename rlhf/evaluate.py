"""Evaluate and compare checkpoints on a prompt set: rewards with bootstrap CIs, KL to the base,
length, EOS rate, diversity, base perplexity, win rates; report.json/.md, samples.jsonl, plots.

    python scripts/evaluate.py --checkpoints out_a/final out_b/final --include_base \\
        --dataset builtin:prompts --reward_funcs sentiment --output_dir report/
    rlhf.evaluate.evaluate([...], dataset=..., reward_funcs=[...]) -> the same report dict

Sampling is seeded per (prompt, sample) (``rlhf.rollout.sample_responses`` with ``row_seeds``), so a prompt's
response depends only on the seed and the settings: not on batch size, batch order or the
number of processes. Every checkpoint uses the same seeds (paired comparison). The training
loop's periodic evaluation calls ``sample_and_score`` too.

With tools or an environment (``--tools`` / ``--environment``, or by default those of the run a
checkpoint comes from: rlhf.run_settings) each response is a multi-turn episode, sampled and
rewarded as in training; the report adds tool success, tool calls and turns per episode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from rlhf.adapters import ADAPTER_WEIGHTS, INIT_ADAPTER_DIR, adapter_load_errors, read_adapter_config
from rlhf.algorithms import kl_penalty
from rlhf.config import check_episode_limits, reward_weights_list
from rlhf.data import (check_room_for_prompt, default_eval_split, format_prompt, load_prompt_dataset,
                       prompt_token_lengths)
from rlhf.errors import CheckpointError, ConfigError, DataError
from rlhf.rollout import Rollout, forward_response, generate_rollout, sampling_cache_bytes, sampling_speedups
from rlhf.run_settings import EpisodeSettings, evaluation_reward, run_config
from rlhf.scoring import RewardTrainerState, reward_inputs

if TYPE_CHECKING:
    from rlhf.episodes import ToolEpisodes

BASE_LABEL = "base"
REFERENCE_SUFFIX = "-reference"  # adapter name of a candidate's init adapter
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Candidate:
    """One model to evaluate: an adapter on ``base`` or a plain model (adapter_dir None).

    ``reference_dir``: the run's init adapter (saved as ``init_adapter/`` next to the adapter), the
    policy training started from and measured its KL against; None = the base model itself.
    """

    label: str
    base: str
    adapter_dir: Path | None = None

    @property
    def reference_dir(self) -> Path | None:
        if self.adapter_dir is None:
            return None
        reference = self.adapter_dir / INIT_ADAPTER_DIR
        return reference if (reference / ADAPTER_CONFIG).is_file() else None


def resolve_candidate(spec: str) -> Candidate:
    """final/ dir, checkpoints/step-N/ dir, a run's output_dir (-> final/), or a model dir / hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return Candidate(spec, _adapter_base(path), path)
        if (path / "final" / ADAPTER_CONFIG).is_file():
            return Candidate(spec, _adapter_base(path / "final"), path / "final")
        if (path / "config.json").is_file():
            return Candidate(spec, spec)
        if (path / "checkpoints").is_dir():
            raise CheckpointError(f"run dir {spec} has no final/ adapter yet; pass one of its checkpoints/step-N dirs")
        raise CheckpointError(f"{spec} is neither an adapter dir, a run dir with final/, nor a model dir")
    if path.exists() or not _looks_like_hub_id(spec):
        raise CheckpointError(f"checkpoint dir not found: {spec}")
    return Candidate(spec, spec)  # a hub id (or the embedded model's name)


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec)) and not re.search(r"(^|/)(final|step-\d+)$", spec) \
        and not spec.startswith(".")


def _adapter_base(adapter_dir: Path) -> str:
    settings = read_adapter_config(adapter_dir, f"adapter {adapter_dir}")
    base = settings.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG} does not name its base model")
    from rlhf.models import EMBEDDED_MODEL

    # Adapters of the embedded model record its converted cache dir; on another machine (or with
    # another RLHF_CACHE_DIR) that dir is missing, and the embedded name rebuilds it.
    if Path(base).name == EMBEDDED_MODEL and not Path(base).exists():
        return EMBEDDED_MODEL
    return base


def _evaluation_tokenizer(candidates: list[Candidate], base_id: str, chat_template_given: bool) -> Any:
    """The tokenizer the adapters' runs trained with, which their final/ and checkpoints save
    (its chat template is how a run's prompts were written, e.g. one set through the Python API's
    processing_class); the base model's where no adapter saved one. Every row is sampled with it,
    the base's too (training measured KL against the base on these prompts). Runs whose saved
    templates differ cannot share one evaluation unless --chat_template sets one for all."""
    from rlhf.models import load_tokenizer

    adapters = [c for c in candidates if c.adapter_dir is not None]
    saved = [c for c in adapters if (c.adapter_dir / "tokenizer_config.json").is_file()]
    if not saved:
        return load_tokenizer(base_id)
    base = load_tokenizer(base_id) if len(saved) < len(adapters) else None  # what one without a saved tokenizer used
    tokenizers = [load_tokenizer(str(c.adapter_dir)) if c in saved else base for c in adapters]
    differing = [c.label for c, t in zip(adapters, tokenizers) if t.chat_template != tokenizers[0].chat_template]
    if differing and not chat_template_given:
        raise ConfigError(f"checkpoints {adapters[0].label} and {differing[0]} were trained with different chat "
                          "templates (their saved tokenizers, or the base model's where none was saved), so their "
                          "prompts would be written differently; evaluate them separately, or pass --chat_template to "
                          "write every prompt with one")
    return tokenizers[0]


def _only_a_train_split(message: str) -> bool:
    """Whether a refused split's message (rlhf.data's "has splits a, b, not 'test'", datasets'
    "Unknown split ... Should be one of ['a', 'b']") lists train as the data's only split."""
    local = re.search(r"has splits (.*), not '", message)
    hub = re.search(r"Should be one of \[(.*?)\]", message)
    listed = local.group(1).split(", ") if local else [name.strip(" '\"") for name in hub.group(1).split(",")] if hub else []
    return listed == ["train"]


def _prompts_of(dataset: str, split: str, prompt_column: str | None,
                run: tuple[Candidate, dict[str, Any]] | None) -> tuple[Any, str]:
    """The prompt dataset and its prompt column: the given one; else the run's own prompt_column
    (``run``: ``run_config``'s, its config.yaml) where the dataset has that column; else "prompt"."""
    runs_column = run[1].get("prompt_column") if run is not None and prompt_column is None else None
    if isinstance(runs_column, str) and runs_column != "prompt":
        try:
            return load_prompt_dataset(dataset, split, runs_column), runs_column
        except DataError as exc:
            if f"has no column {runs_column!r}" not in str(exc):
                raise
    column = prompt_column or "prompt"
    return load_prompt_dataset(dataset, split, column), column


def _same_model(a: str, b: str) -> bool:
    from rlhf.models import EMBEDDED_MODEL, embedded_model_dir

    # Only names are compared here (resolve_model_path would refuse a base that is not on disk).
    a, b = (str(embedded_model_dir()) if name == EMBEDDED_MODEL else name for name in (a, b))
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def common_base(candidates: list[Candidate]) -> str:
    """The base every adapter was trained on; adapters of different bases cannot be compared."""
    adapters = [c for c in candidates if c.adapter_dir is not None]
    base = adapters[0].base if adapters else candidates[0].base
    for candidate in adapters:
        if not _same_model(candidate.base, base):
            raise CheckpointError(
                f"adapter {candidate.label} was trained on base model {candidate.base}, but {adapters[0].label} on "
                f"{base}; compare adapters of one base model"
            )
    return base


# ---------------------------------------------------------------------------------------------
# Sampling and per-sample scores (shared with the training loop's evaluation)
# ---------------------------------------------------------------------------------------------


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of one (prompt, sample): independent of batching and processes."""
    return (seed * 1_000_003 + prompt_index) * 1009 + sample_index


def sample_and_score(
    policy: Any,
    tokenizer: Any,
    dataset: Any,
    prompt_indices: list[int],
    reward: Callable[..., Any],
    *,
    base: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    num_samples: int = 1,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_length: int = 256,
    prompt_column: str = "prompt",
    batch_size: int = 16,
    eos_token_ids: list[int] | None = None,
    reward_extras: dict[str, Any] | None = None,
    progress: Any = None,
    episodes: ToolEpisodes | None = None,
    speedups: bool = True,
    share_prompt_prefix: bool | None = None,
) -> list[dict[str, Any]]:
    """Sample ``num_samples`` responses per prompt from ``policy`` and score each one.

    Sampling takes training's speed-ups (``rlhf.rollout.sampling_speedups``: LoRA folded, faster
    linears, the forward without the module stack; a prompt's samples share its prefill): the
    same distribution up to float rounding. ``speedups=False`` where DeepSpeed/FSDP own the tensors.
    ``share_prompt_prefix``: None follows ``speedups`` (a training run passes its own setting).

    ``reward_extras``: keywords every reward call gets besides the rollout's (a training run's
    trainer_state and log_metric, so its periodic evaluation calls rewards as training does).

    base() enters a context yielding the base model (e.g. the policy with its adapter disabled);
    None means the policy is the base (KL 0). Returns one record per (prompt, sample) with the
    response, rewards per function and combined, the sequence KL to the base at the sampling
    temperature (k1, nats), token count, EOS flag and the response's NLL under the base (T=1).
    ``eos_token_ids``: the model's stop set (rlhf.models.stop_token_ids; None = read off ``policy``).
    ``progress``: a tqdm bar advanced by each scored response.

    ``episodes``: the run's tools and environments (rlhf.episodes.ToolEpisodes): each response is
    then a multi-turn episode sampled as in training (max_new_tokens bounds the whole episode), its
    ``response`` the conversational completion (assistant and tool messages), and the record adds
    ``turns``, ``tool_calls``, ``tool_failures``, ``truncated`` and ``turn_reward`` (the tools'
    turn rewards, counted in ``reward`` as training's reward_mean counts them). KL, base NLL and
    ``tokens`` cover the sampled tokens only; tool tokens are context.
    """
    jobs = [(p, s) for p in prompt_indices for s in range(num_samples)]
    records = []
    if episodes is not None and eos_token_ids is None:
        from rlhf.models import stop_token_ids

        eos_token_ids = stop_token_ids(policy, tokenizer)
    share = speedups if share_prompt_prefix is None else share_prompt_prefix
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        rows = dataset.select([p for p, _ in chunk])
        raw = rows[prompt_column]
        # lists, as training passes them (a datasets Column is not JSON-serialisable, nor a list)
        columns = {name: list(rows[name]) for name in rows.column_names if name != prompt_column}
        row_seeds = [sample_seed(seed, p, s) for p, s in chunk]
        # per chunk: the scores below need the policy as it is (adapters on, weights unmerged)
        cache_bytes = sampling_cache_bytes(policy, len(chunk), max_prompt_length, max_new_tokens, episodes is not None)
        longest = None if episodes is not None else max_prompt_length + max_new_tokens
        with sampling_speedups(policy, enabled=speedups, reserve_bytes=cache_bytes,
                               columns=longest) as (sampler, fast_forward):
            if episodes is not None:
                from rlhf.episodes.runner import sample_episode_rollout

                rollout = sample_episode_rollout(
                    episodes, sampler, [dict(row) for row in rows], prompt_column=prompt_column,
                    group_ids=[p for p, _ in chunk], columns=columns, max_completion_length=max_new_tokens,
                    max_prompt_length=max_prompt_length, temperature=temperature, top_p=top_p,
                    stop_ids=eos_token_ids, row_seeds=row_seeds, share_prompt_prefix=share,
                    fast_forward=fast_forward)
            else:
                rollout = generate_rollout(
                    sampler, tokenizer, [format_prompt(p, tokenizer) for p in raw], prompts=list(raw),
                    group_ids=[p for p, _ in chunk], columns=columns, max_prompt_length=max_prompt_length,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    row_seeds=row_seeds, eos_token_ids=eos_token_ids, share_prompt_prefix=share,
                    fast_forward=fast_forward,
                )
        output = reward(rollout.prompts, rollout.completions, **reward_inputs(rollout), **(reward_extras or {}))
        rewards = output.combined()  # outcome + process rewards
        scores = _base_scores(policy, rollout, base, temperature, speedups)
        for i, (prompt_index, sample_index) in enumerate(chunk):
            record = {
                "prompt_index": prompt_index, "sample_index": sample_index, "prompt": rollout.prompts[i],
                "response": rollout.completions[i], "rewards": {k: float(v[i]) for k, v in output.components.items()},
                "reward": float(rewards[i]), "kl": float(scores["kl"][i]), "tokens": int(rollout.mask[i].sum()),
                "eos": bool(rollout.eos_found[i]), "base_nll": float(scores["base_nll"][i]),
            }
            if rollout.episodes is not None:
                record.update(_episode_fields(rollout.episodes[i]))
                record["reward"] += record["turn_reward"]
            records.append(record)
        if progress is not None:
            progress.update(len(chunk))
    return records


def _episode_fields(episode: Any) -> dict[str, Any]:
    """What a record keeps of a rlhf.episodes.Episode besides its messages."""
    return {"turns": episode.turns, "tool_calls": episode.tool_calls, "tool_failures": episode.tool_failures,
            "truncated": episode.truncated, "turn_reward": float(sum(episode.turn_rewards))}


@torch.no_grad()
def _base_scores(policy: Any, rollout: Rollout, base: Callable[[], Any] | None, temperature: float,
                 speedups: bool = True) -> dict[str, Any]:
    """Per-row KL to the base and base NLL. Each row is scored alone, without the padding of its
    batch, so the numbers are bit-identical whatever the batch size or process count. With
    ``speedups`` the passes take the policy's LoRA folded and the faster linear products
    (``merged_lora_weights``, ``inference_linears``; one row of SmolLM2-135M, 90 tokens: 252 ->
    185 ms, logprobs 4e-5 apart)."""
    from rlhf.models import PolicyWithValue, inference_linears, merged_lora_weights

    def faster(model: Any) -> contextlib.AbstractContextManager[Any]:
        return inference_linears(model) if speedups else contextlib.nullcontext()

    # Greedy decoding (T = 0) has no sampling distribution; its KL is measured at T = 1.
    temperature = temperature if temperature > 0 else 1.0
    rows = list(_unpadded_rows(rollout))
    # The policy passes must run before entering base(): for a PEFT policy that context switches
    # the adapter off.
    with (merged_lora_weights(policy) if speedups else contextlib.nullcontext(policy)) as folded, faster(folded):
        policy_lps = [forward_response(PolicyWithValue(folded, None), row, slice(None), temperature)[0]
                      for row in rows]
    kls, nlls = [], []
    with (base() if base is not None else contextlib.nullcontext(policy)) as base_model, faster(base_model):
        base_wrapped = PolicyWithValue(base_model, None)
        for row, policy_lp in zip(rows, policy_lps):
            base_lp = forward_response(base_wrapped, row, slice(None), temperature)[0] if base is not None else policy_lp
            base_lp_t1 = base_lp if temperature == 1.0 else forward_response(base_wrapped, row, slice(None), 1.0)[0]
            kls.append(float(kl_penalty(policy_lp, base_lp, "k1", row.mask).sum()))
            nlls.append(float(-(base_lp_t1 * row.mask).sum()))
    return {"kl": kls, "base_nll": nlls}


def _unpadded_rows(rollout: Rollout) -> Iterator[Rollout]:
    """Each sequence as its own one-row rollout: prompt padding and tokens after EOS removed.
    An episode keeps its whole span (tool tokens between sampled turns are context the model
    attends to) and its ``mask`` on the sampled tokens, what KL and NLL count."""
    prompt_length = rollout.input_ids.shape[1] - rollout.response_length
    span = rollout.span
    for i in range(len(rollout)):
        start = int((rollout.attention_mask[i, :prompt_length] == 0).sum())
        length = max(int(span[i].sum()), 1)
        yield Rollout(
            input_ids=rollout.input_ids[i:i + 1, start:prompt_length + length],
            attention_mask=rollout.attention_mask[i:i + 1, start:prompt_length + length],
            response_ids=rollout.response_ids[i:i + 1, :length], mask=rollout.mask[i:i + 1, :length],
            eos_found=rollout.eos_found[i:i + 1], group_ids=rollout.group_ids[i:i + 1],
            prompts=rollout.prompts[i:i + 1], completions=rollout.completions[i:i + 1],
            episode_mask=None if rollout.episode_mask is None else rollout.episode_mask[i:i + 1, :length],
        )


@contextlib.contextmanager
def adapter_disabled(peft_model: Any) -> Iterator[Any]:
    """The base model as a context: the same weights with the LoRA adapter switched off."""
    from rlhf.models import adapters_off

    with adapters_off(peft_model):
        yield peft_model


@contextlib.contextmanager
def adapter_active(peft_model: Any, name: str) -> Iterator[Any]:
    """The PEFT model with adapter ``name`` active (e.g. a run's init adapter), then the previous one again."""
    previous = peft_model.active_adapter
    peft_model.set_adapter(name)
    try:
        yield peft_model
    finally:
        peft_model.set_adapter(previous)


def shared_reference(candidates: list[Candidate]) -> Candidate | None:
    """The candidate whose init adapter every adapter candidate shares (the same weights), if any:
    then the "base" row is that starting policy, the one their KL is measured against."""
    adapters = [c for c in candidates if c.adapter_dir is not None]
    if not adapters or any(c.reference_dir is None for c in adapters):
        return None
    contents = {(c.reference_dir / ADAPTER_WEIGHTS).read_bytes() for c in adapters}
    return adapters[0] if len(contents) == 1 else None


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def evaluate(
    checkpoints: list[str],
    dataset: str = "builtin:prompts",
    reward_funcs: list[str] | None = None,
    output_dir: str | None = None,
    *,
    include_base: bool = False,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    num_prompts: int | None = None,
    dataset_split: str | None = None,
    prompt_column: str | None = None,
    max_prompt_length: int = 256,
    reward_weights: list[float] | None = None,
    reward_kwargs: dict[str, dict[str, Any]] | None = None,
    bootstrap_resamples: int = 2000,
    update_model_cards: bool = True,
    accelerator: Any = None,
    tools: list[Any] | None = None,
    environment_factory: Any = None,
    max_tool_calling_iterations: int | None = None,
    tool_timeout: float | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoints`` (and the base with include_base); returns report.json's dict and,
    with output_dir, writes report.json, report.md, samples.jsonl and the PNG plots, and (with
    update_model_cards) each run adapter's summary into its model card (rlhf.card.record_evaluation).

    ``tools`` / ``environment_factory`` (and the episode settings after them, as RLConfig's): each
    response is a multi-turn episode, sampled and rewarded as in training (an environment's
    get_reward joins the rewards). Unset: the run's own, from the first checkpoint's config.yaml
    (EpisodeSettings.resolve)."""
    from rlhf.distributed import make_accelerator
    from accelerate.utils import gather_object

    from rlhf import report as reporting
    from rlhf.benchmark import model_config
    from rlhf.card import read_run_settings
    from rlhf.models import check_sequence_fits, check_tokenizer_fits, load_base_model, stop_token_ids

    _check_settings(checkpoints, include_base, num_samples, max_new_tokens, temperature, top_p, batch_size, num_prompts)
    check_episode_limits(max_tool_calling_iterations, tool_timeout)
    reward_weights = reward_weights_list(reward_weights)  # an array of weights was a JSON traceback at the end
    candidates = [resolve_candidate(spec) for spec in checkpoints]
    for candidate in candidates:  # a damaged run config.yaml is refused before any work (ConfigError)
        if candidate.adapter_dir is not None:
            read_run_settings(candidate.adapter_dir)
    base_id = common_base(candidates)
    split = dataset_split or default_eval_split(dataset) or "train"  # the held-out prompts, as training's evaluation
    run = run_config(candidates)  # the run whose settings are read: prompt column, trainer_state
    try:
        prompts, prompt_column = _prompts_of(dataset, split, prompt_column, run)
    except DataError as exc:
        # data whose only split is train (a dir of one file, a hub dataset of one split) has only its
        # training prompts to give; data with another held-out split (validation) is refused, as
        # training's evaluation refuses it, rather than evaluated on the prompts it trained on
        if dataset_split is not None or not _only_a_train_split(str(exc)):
            raise
        split = "train"
        prompts, prompt_column = _prompts_of(dataset, split, prompt_column, run)
    count = len(prompts) if num_prompts is None else min(num_prompts, len(prompts))
    accelerator = accelerator or make_accelerator()
    tokenizer = _evaluation_tokenizer(candidates, base_id, chat_template_given=chat_template is not None)
    given = dict(tools=tools, environment_factory=environment_factory, chat_template=chat_template,
                 max_tool_calling_iterations=max_tool_calling_iterations, tool_timeout=tool_timeout,
                 chat_template_kwargs=chat_template_kwargs)
    episode_settings = EpisodeSettings.resolve(given, candidates)
    episodes = episode_settings.build(tokenizer)  # before any model loads: a bad tool spec fails fast
    check_room_for_prompt(tokenizer, max_prompt_length)
    # as training refuses them: beyond a learned position table sampling fails with a bare index error
    for model in dict.fromkeys([base_id, *(c.base for c in candidates if c.adapter_dir is None)]):
        check_sequence_fits(model_config(model), max_prompt_length, max_new_tokens)
    evaluated = prompts.select(range(count))
    if episodes is not None:
        accelerator.print(f"episodes: {episode_settings.describe()} ({episode_settings.source})")
        # the tools' schemas sit in the rendered prompt: a cut one loses its system message first
        lengths = [episodes.prompt_length(row, prompt_column) for row in evaluated]
    else:
        lengths = prompt_token_lengths(evaluated[prompt_column], tokenizer)
    too_long = sum(length > max_prompt_length for length in lengths)
    if too_long and accelerator.is_main_process:  # the rollout keeps each one's end (left truncation)
        rendered = " once the tools are rendered into them" if episodes is not None else ""
        warnings.warn(f"{too_long} of {count} prompts are longer than max_prompt_length {max_prompt_length} tokens"
                      f"{rendered} (longest {max(lengths)}) and lose their beginning; raise --max_prompt_length",
                      stacklevel=2)
    reward, reward_settings = evaluation_reward(candidates, reward_funcs, reward_weights, reward_kwargs, episodes,
                                                accelerator.device)
    # TRL passes every reward call a trainer_state: the end of the run whose settings are read, for every row
    # (so all rows are scored by one reward), as a scheduled reward stood when training finished
    finished = run[1].get("max_steps") if run is not None else None
    finished = finished if isinstance(finished, int) and not isinstance(finished, bool) else 0
    if reward_settings["reward_source"] != "given":
        accelerator.print(f"rewards: {', '.join(map(str, reward_settings['reward_funcs'])) or 'none'} "
                          f"({reward_settings['reward_source']})")
    local_prompts = list(range(count))[accelerator.process_index::accelerator.num_processes]

    stops = stop_token_ids(base_id, tokenizer)
    with accelerator.main_process_first():
        base_model = load_base_model(base_id).to(accelerator.device).eval()
    check_tokenizer_fits(base_model, tokenizer)  # every process, outside the barrier
    peft_model, names = _attach_adapters(base_model, candidates)
    starting_policy = shared_reference(candidates)
    settings = dict(num_samples=num_samples, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, max_prompt_length=max_prompt_length, prompt_column=prompt_column,
                    batch_size=batch_size, eos_token_ids=stops, episodes=episodes,
                    reward_extras={"trainer_state": RewardTrainerState(finished, finished)})

    def base_model_itself() -> contextlib.AbstractContextManager[Any]:
        # PeftModel.from_pretrained injects LoRA layers into base_model itself: the plain base
        # is the PEFT model with its adapters switched off.
        return adapter_disabled(peft_model) if peft_model is not None else contextlib.nullcontext(base_model)

    def the_base() -> contextlib.AbstractContextManager[Any]:
        """The "base" row: the shared starting policy of init-adapter runs, else the base model."""
        if starting_policy is not None:
            return adapter_active(peft_model, names[starting_policy.label] + REFERENCE_SUFFIX)
        return base_model_itself()

    def reference_of(candidate: Candidate) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        """What a candidate's KL is measured against: its run's init adapter, else the base model."""
        if candidate.reference_dir is None:
            return base_model_itself
        return lambda: adapter_active(peft_model, names[candidate.label] + REFERENCE_SUFFIX)

    labels = ([BASE_LABEL] if include_base else []) + [c.label for c in candidates]
    by_label = {c.label: c for c in candidates}
    records: dict[str, list[dict[str, Any]]] = {}
    from tqdm.auto import tqdm

    # This process's share, on the main process only: responses done / total and the time left.
    progress = tqdm(total=len(labels) * len(local_prompts) * num_samples, desc="evaluate", unit="response",
                    disable=not accelerator.is_main_process)
    settings["progress"] = progress
    for label in labels:
        candidate = by_label.get(label)
        if candidate is not None and candidate.adapter_dir is not None:
            peft_model.set_adapter(names[label])
            local = sample_and_score(peft_model, tokenizer, prompts, local_prompts, reward,
                                     base=reference_of(candidate), **settings)
        elif candidate is None or _same_model(candidate.base, base_id):  # the base row, or the base model by name
            with (the_base() if candidate is None else base_model_itself()) as model:
                local = sample_and_score(model, tokenizer, prompts, local_prompts, reward, base=None, **settings)
        else:  # a different full model, compared against the base model
            other = load_base_model(candidate.base).to(accelerator.device).eval()
            local = sample_and_score(other, tokenizer, prompts, local_prompts, reward, base=base_model_itself,
                                     **{**settings, "eos_token_ids": stop_token_ids(candidate.base, tokenizer)})
            del other
        gathered = gather_object(local) if accelerator.num_processes > 1 else local
        records[label] = sorted(gathered, key=lambda r: (r["prompt_index"], r["sample_index"]))
    progress.close()

    report = reporting.build_report(
        records, baseline=BASE_LABEL if include_base else None, seed=seed, resamples=bootstrap_resamples,
        settings={"checkpoints": checkpoints, "base_model": base_id,
                  "base_row": f"init adapter of {starting_policy.label}" if starting_policy else "base model",
                  "kl_reference": {c.label: "init adapter" if c.reference_dir else "base model" for c in candidates},
                  "dataset": dataset, "dataset_split": split,
                  "num_prompts": count, **reward_settings, "include_base": include_base, "num_samples": num_samples,
                  "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "max_prompt_length": max_prompt_length, "bootstrap_resamples": bootstrap_resamples,
                  "num_processes": accelerator.num_processes, **episode_settings.report_settings()},
    )
    if output_dir is not None and accelerator.is_main_process:
        from rlhf.card import record_evaluation, run_label
        from rlhf.plots import checkpoint_names

        # Plots name an adapter by its run, so plots of several runs' final/ stay apart.
        runs = {c.label: run_label(c.adapter_dir) for c in candidates if c.adapter_dir is not None}
        reporting.write_outputs(Path(output_dir), report, records, checkpoint_names(labels, runs))
        adapters = [c for c in candidates if c.adapter_dir is not None] if update_model_cards else []
        for candidate in adapters:
            summary = reporting.evaluation_summary(report, candidate.label, Path(output_dir))
            accelerator.print(record_evaluation(candidate.adapter_dir, summary))
    accelerator.wait_for_everyone()
    return report


def _attach_adapters(base_model: Any, candidates: list[Candidate]) -> tuple[Any, dict[str, str]]:
    """One PeftModel holding every adapter by name; the base weights are loaded once."""
    from peft import PeftModel

    names: dict[str, str] = {}
    peft_model = None
    for i, candidate in enumerate(c for c in candidates if c.adapter_dir is not None):
        name = f"candidate{i}"
        with adapter_load_errors(f"adapter {candidate.label}", "does not fit its base model"):
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base_model, str(candidate.adapter_dir), adapter_name=name)
            else:
                peft_model.load_adapter(str(candidate.adapter_dir), adapter_name=name)
            if candidate.reference_dir is not None:
                peft_model.load_adapter(str(candidate.reference_dir), adapter_name=name + REFERENCE_SUFFIX)
        names[candidate.label] = name
    if peft_model is not None:
        peft_model.eval()
    return peft_model, names


def _check_settings(checkpoints: list[str], include_base: bool, num_samples: int, max_new_tokens: int,
                    temperature: float, top_p: float, batch_size: int, num_prompts: int | None) -> None:
    if not checkpoints:
        raise ConfigError("give at least one checkpoint (--checkpoints DIR [DIR ...])")
    if len(set(checkpoints)) != len(checkpoints) or (include_base and BASE_LABEL in checkpoints):
        raise ConfigError("each checkpoint may be given once")
    for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if num_prompts is not None and num_prompts < 1:
        raise ConfigError(f"num_prompts must be >= 1, got {num_prompts}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")



@dataclass
class EvalConfig:
    """Flags of scripts/evaluate.py (also a YAML file via --config)."""

    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "Adapter dirs (final/ or checkpoints/step-N/), run output dirs, or model dirs / hub ids."})
    include_base: bool = field(default=False, metadata={"help": "Also evaluate the base model (and win rates vs it)."})
    dataset: str = field(default="builtin:prompts", metadata={
        "help": "Prompts: .jsonl/.json/.csv/.parquet, a datasets dir, or builtin:prompts (its eval split)."})
    dataset_split: str | None = field(default=None, metadata={
        "help": "Split (default: the one training's periodic evaluation reads: eval of a built-in set, else test, "
                "or train where that is its only split)."})
    prompt_column: str | None = field(default=None, metadata={
        "help": "Column with the prompt (default: the run's prompt_column where the dataset has it, else 'prompt')."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use the first N prompts (default: all)."})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "Reward functions, as in training (built-in names, file.py:fn, module:fn, RM dir, URL). Default: "
                "the run's own, from the config.yaml of the first checkpoint's run (else sentiment)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight per reward function."})
    reward_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Parameters per reward name (JSON on the CLI)."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where report.json/.md, samples.jsonl, PNGs go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the files of a report (report.json/.md, samples.jsonl, the PNGs) already in output_dir."})
    num_samples: int = field(default=1, metadata={"help": "Responses per prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum response length in tokens."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts longer than this are truncated from the left."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    seed: int = field(default=0, metadata={"help": "Seed of every (prompt, sample) draw and of the bootstrap."})
    batch_size: int = field(default=16, metadata={"help": "Responses generated per batch (does not change results)."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples for the 95 percent intervals."})
    update_model_cards: bool = field(default=True, metadata={
        "help": "Record each checkpoint's summary beside it (evaluation.json) and in its model card (README.md), "
                "for adapters of a run (final/, checkpoints/step-N); export.py carries both into the merged model."})
    # --- multi-turn episodes, as in training (RLConfig's fields); unset = the run's own
    tools: list[str] | None = field(default=None, metadata={
        "help": "Tools the model may call (path/to/file.py:function or package.module:function): each response is "
                "a multi-turn episode, sampled as in training (max_new_tokens bounds the whole episode). Default, "
                "with no --environment either: the run's own, from the config.yaml of the first checkpoint's run; "
                "a bare --tools: none (one-turn responses)."})
    environment_factory: str | dict[str, str] | None = field(default=None, metadata={
        "help": "Environment class (path/to/file.py:Class or package.module:Class; a YAML mapping {name: spec} by "
                "the dataset's environment column), one instance per episode; its get_reward joins the rewards "
                "(weight 1). Default: the run's own (see tools). CLI: --environment."})
    max_tool_calling_iterations: int | None = field(default=None, metadata={
        "help": "Turns whose tool calls are executed per episode. Default: the run's own, else no limit."})
    tool_timeout: float | None = field(default=None, metadata={
        "help": "Seconds a tool call may take. Default: the run's own, else 30."})
    chat_template: str | None = field(default=None, metadata={
        "help": "Chat template instead of the tokenizer's (prompts and episodes): a .jinja file or one of TRL's "
                "template names (qwen3). Default: the run's own, else the tokenizer's."})
    chat_template_kwargs: dict[str, Any] | None = field(default=None, metadata={
        "help": "Extra chat template keywords for episodes (JSON). Default: the run's own, else none."})

    def __post_init__(self) -> None:
        _check_settings(self.checkpoints, self.include_base, self.num_samples, self.max_new_tokens, self.temperature,
                        self.top_p, self.batch_size, self.num_prompts)
        check_episode_limits(self.max_tool_calling_iterations, self.tool_timeout)
        if self.bootstrap_resamples < 100:
            raise ConfigError(f"bootstrap_resamples must be >= 100, got {self.bootstrap_resamples}")


def evaluate_from_config(config: EvalConfig) -> dict[str, Any]:
    """The command: refuses to overwrite an earlier report, or any file of one (a training run's
    samples.jsonl), unless asked; then evaluates."""
    from rlhf.cpu_linear import check_cpu_settings
    from rlhf.report import OUTPUT_FILES

    check_cpu_settings()
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():  # found only when the report is written, after the work
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder; choose another --output_dir")
    taken = [name for name in OUTPUT_FILES if (output_dir / name).exists()]
    if taken and not config.overwrite_output_dir:
        raise ConfigError(f"{output_dir} already holds {', '.join(taken)}, which a report would replace (an earlier "
                          "report's, or a training run's); choose another --output_dir or pass --overwrite_output_dir "
                          "true")
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("checkpoints", "overwrite_output_dir")}
    return evaluate(config.checkpoints, **options)
