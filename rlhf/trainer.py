"""The RL loop, read as the policy-gradient pseudo-code:

    for step in range(max_steps):
        rollout = self.rollout()                                   # sample responses (LoRA policy)
        scores, token_scores, metrics = self.score(rollout)        # reward functions on the text
        batch, metrics = self.make_experience(rollout, scores, token_scores)  # old/ref logprobs, values, KL, A, R
        metrics = self.update(batch)                               # rlhf.update.UPDATERS[update_method]
        log, save

With dynamic_sampling, rollout and score repeat until the batch holds enough groups whose
rewards differ (rlhf.scoring.sample_with_spread).

The algorithm is chosen only through the registries (``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``,
``UPDATERS``) and what their entries say they need; nothing here branches on their names.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import torch
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm

from reward_models import CombinedReward
from rlhf import checkpoint as ckpt
from rlhf import lineage
from rlhf.adapters import read_init_adapter
from rlhf.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AdaptiveKLController, FixedKLController
from rlhf.algorithms import MovingAverageBaseline
from rlhf.config import RLConfig, changed_settings, save_config, with_overrides
from rlhf.data import PromptSampler, check_prompt_lengths, describe_dataset, load_eval_dataset, load_prompt_dataset
from rlhf.build import build_model, fused_adamw, use_fused_adamw
from rlhf.cpu_linear import check_cpu_settings, forget_memory_choices, transposed_weights_kept
from rlhf.cpu_memory import keep_freed_memory, keeping_freed_memory, release_freed_memory
from rlhf.card import render_model_card
from rlhf.distributed import (Reducer, configure_sharding, gathered_state, make_accelerator, shards_weights,
                              unwrapped_full_weights)
from rlhf.episodes.chat import resolve_chat_template
from rlhf.errors import ConfigError, TrainingDiverged, UserError
from rlhf.evaluate import adapter_disabled, sample_and_score
from rlhf.experience import Experience, make_experience, plan_passes
from rlhf.models import PolicyWithValue, check_sequence_fits, check_tokenizer_fits, load_tokenizer, stop_token_ids
from rlhf.python_gc import long_lived_objects_frozen, thaw_long_lived_objects
from rlhf.rollout import Rollout, sample_rollout
from rlhf.runlock import LOCK_FILE, OutputDirLock
from rlhf.scoring import LOGGED_BY_REWARDS, RewardTrainerState, logged_over_a_trainer_metric, sample_with_spread, score
from rlhf.signals import ScoringInterrupted, StopOnSignal, TrainingInterrupted, run_abandonable
from rlhf.tracking import append_samples, check_wandb_login, completion_rows, flat_config, log_completions, make_trackers, metrics_row
from rlhf.tracking import throughput, tracker_names
from rlhf.update import UPDATERS

# Distinct sampling streams per process (RL_NOTES 5): a large prime keeps seeds of ranks apart.
RANK_SEED_STRIDE = 100003


@dataclass
class RolloutState:
    """What a step's rollout consumes: the prompt order and every random stream a checkpoint saves
    (Accelerate saves Python's, NumPy's, torch's and CUDA's)."""

    sampler: dict[str, Any]
    python: Any
    numpy: Any
    torch: Tensor
    cuda: list[Tensor] | None

    @classmethod
    def capture(cls, sampler: PromptSampler) -> RolloutState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(sampler.state_dict(), random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def write_into(self, accelerate_dir: Path, process_index: int) -> None:
        """Replace the random streams in the state Accelerate just saved with these."""
        file = accelerate_dir / f"random_states_{process_index}.pkl"
        saved = torch.load(file, weights_only=False)  # written a moment ago by this process
        saved.update(random_state=self.python, numpy_random_seed=self.numpy, torch_manual_seed=self.torch)
        if self.cuda is not None:
            saved["torch_cuda_manual_seed"] = self.cuda
        torch.save(saved, file)

    def restore(self, sampler: PromptSampler) -> None:
        sampler.load_state_dict(self.sampler)
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def make_episodes(config: RLConfig, tokenizer: Any, accelerator: Any) -> Any:
    """The run's tools and environments (rlhf.episodes.ToolEpisodes), or None without them."""
    if not config.episodes:
        return None
    from rlhf.distributed import needs_synced_generation
    from rlhf.episodes import ToolEpisodes

    if needs_synced_generation(accelerator):
        # Sharded weights need every process in each forward; episodes end after different turns.
        raise ConfigError("tools / environment_factory do not run under FSDP2, whose sampling needs every process in "
                          "every decoding step while episodes end after different turns; use DDP or DeepSpeed")
    return ToolEpisodes(tokenizer, config.tools, config.environment_factory,
                        template_kwargs=config.chat_template_kwargs,
                        max_tool_calling_iterations=config.max_tool_calling_iterations, tool_timeout=config.tool_timeout)


def combined_reward(config: RLConfig, episodes: Any, device: Any) -> CombinedReward:
    """The reward functions, then each environment class's ``get_reward`` (weight 1, named after the
    class, as TRL adds them)."""
    environment_rewards = [fn for _, fn in episodes.reward_functions()] if episodes is not None else []
    if not config.reward_funcs and not environment_rewards:
        raise ConfigError("reward_funcs needs at least one reward function (e.g. sentiment), unless an environment "
                          "class with a get_reward method pays the reward")
    weights = (None if config.reward_weights is None
               else list(config.reward_weights) + [1.0] * len(environment_rewards))
    return CombinedReward(list(config.reward_funcs) + environment_rewards, weights, config.reward_kwargs,
                          device=device, on_error=config.reward_error, timeout=config.reward_timeout)


# What stands in for GRPOTrainer's arguments that RLTrainer refuses
UNHEARD_ARGUMENTS = {
    "reward_processing_classes": "a reward model's tokenizer is loaded from its dir; to give one, pass "
                                 "reward_models.learned.LearnedReward.from_model(model, tokenizer) as the reward function",
    "callbacks": "the RL loop calls no TrainerCallback; metrics go to metrics.jsonl and the report_to trackers",
    "optimizers": "the trainer builds AdamW over the adapter (and value head) from learning_rate, weight_decay, "
                  "lr_scheduler_type and warmup_steps",
    "quantization_config": "the policy loads in float32, or bfloat16 with bf16",
    "rollout_func": "responses come from the policy's own sampler; multi-turn episodes take environment_factory or tools",
}


class RLTrainer:
    """The RL trainer, called as TRL's GRPOTrainer is::

        trainer = RLTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=[my_reward, "sentiment"],
                            args=RLConfig(output_dir="out", max_steps=10), train_dataset=dataset)
        trainer.train()
        trainer.save_model("out/adapter")

    ``model``: a hub id, a local dir or a loaded ``PreTrainedModel`` (default: the config's
    model_name_or_path); ``reward_funcs``: callables and/or ``reward_funcs`` spec strings;
    ``train_dataset`` / ``eval_dataset``: ``datasets.Dataset`` objects or dataset specs;
    ``processing_class``: a tokenizer (default: the model's); ``tools``: functions the model may
    call (TRL's ``tools``); ``environment_factory``: a class or callable making one environment per
    episode, or {name: factory} chosen by the dataset's ``environment`` column (TRL's). Each
    replaces the config's setting. ``RLTrainer(config)`` alone runs what the config says (as the scripts do).
    """

    def __init__(self, config: RLConfig | Any = None, reward_funcs: Any = None, args: RLConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, callbacks: Any = None, optimizers: Any = (None, None),
                 quantization_config: Any = None, peft_config: Any = None, tools: Any = None, rollout_func: Any = None,
                 environment_factory: Any = None, *, model: Any = None):
        # The scripts pass their config first and are refused at once where output_dir holds another
        # run; built as TRL's trainer is (args=...), train(resume_from_checkpoint=...) may still resume it.
        self._other_run_checked = isinstance(config, RLConfig)
        if config is not None and not isinstance(config, RLConfig):  # TRL order: the model comes first
            config, model = None, config
        # GRPOTrainer's arguments, in its order; those that change nothing here are refused, not dropped
        nothing = (None, (None, None), [None, None])
        unheard = {"reward_processing_classes": reward_processing_classes or None, "callbacks": callbacks or None,
                   "optimizers": None if any(optimizers is none or optimizers == none for none in nothing) else optimizers,
                   "quantization_config": quantization_config, "rollout_func": rollout_func}
        for name, value in unheard.items():
            if value is not None:
                raise ConfigError(f"{name} (GRPOTrainer's argument) has no counterpart here: {UNHEARD_ARGUMENTS[name]}")
        config = with_overrides(args or config or RLConfig(), model=model, reward_funcs=reward_funcs,
                                train_dataset=train_dataset, tools=tools, environment_factory=environment_factory,
                                peft_config=peft_config)
        config.check_reward_weights()
        check_cpu_settings()  # a bad RLHF_CPU_LINEAR or RLHF_CPU_MALLOC stops the run here, not later
        forget_memory_choices()
        self.config = config
        self.base_model = model if isinstance(model, torch.nn.Module) else None
        self.output_dir = Path(config.output_dir)
        check_wandb_login(config.report_to)
        self.project_name, self.run_name = tracker_names(config.project_name, config.run_name, self.output_dir)
        trackers = make_trackers(config.report_to, self.project_name, self.run_name, self.output_dir)
        self.metrics_log, self.trackers = trackers[0], trackers  # metrics.jsonl first
        self.accelerator = accelerator = make_accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=trackers,
            project_dir=str(self.output_dir),
            # We step the scheduler once per optimizer step ourselves; Accelerate would step it
            # once per process, assuming sharded dataloaders.
            step_scheduler_with_optimizer=False,
        )
        # the switches go back when training ends unless the process kept freed memory already (the benchmark's)
        self._stops_keeping_freed_memory = not keeping_freed_memory()
        if accelerator.device.type == "cpu":
            keep_freed_memory()  # the update's large buffers are reused, not faulted in afresh
        created_dir = None  # output_dir and the parents this start made (removed again if it is refused)
        try:
            self.reducer = Reducer(accelerator)
            config.check_world_size(accelerator.num_processes)
            estimator, updater = ADVANTAGE_ESTIMATORS[config.advantage_estimator], UPDATERS[config.update_method]
            self.passes = plan_passes(config, estimator, updater)
            # Sequences per forward pass on this process (the no-grad passes use it too).
            self.micro_batch_size = config.mini_batch_size // (accelerator.num_processes * config.gradient_accumulation_steps)
            configure_sharding(accelerator, config, self.micro_batch_size, updater.needs["unsharded_weights"])
            created_dir = ckpt.check_output_dir(self.output_dir, accelerator.process_index,
                                                bool(config.resume_from_checkpoint), config.overwrite_output_dir,
                                                other_run=self._other_run_checked)
            set_seed(config.seed + accelerator.process_index * RANK_SEED_STRIDE)

            self.dataset = load_prompt_dataset(config.dataset, config.dataset_split, config.prompt_column,
                                               config.dataset_config)
            self.eval_dataset = load_eval_dataset(config, eval_dataset) if config.eval_steps else None
            self.tokenizer = load_tokenizer(processing_class or config.model_name_or_path)
            if config.chat_template is not None:
                self.tokenizer.chat_template = resolve_chat_template(config.chat_template)
            self.episodes = make_episodes(config, self.tokenizer, accelerator)  # None: one-turn responses
            self.reward = combined_reward(config, self.episodes, accelerator.device)
            # every id that ends a response
            self.stop_ids = stop_token_ids(self.base_model or config.model_name_or_path, self.tokenizer)
            if self.episodes is not None:  # every row names an environment there is (not found out at some later step)
                self.episodes.check_dataset(self.dataset, describe_dataset(config.dataset))
            check_prompt_lengths(self.dataset, self.tokenizer, config, describe_dataset(config.dataset),
                                 warn=accelerator.is_main_process, episodes=self.episodes)
            # Read (and refused if it cannot be saved with the RL LoRA) before any model loads, so final/
            # and checkpoints can hold init + RL as one adapter of the original base (rlhf.adapters).
            self.init_adapter = read_init_adapter(config.init_adapter) if config.init_adapter else None
            self.model, optimizer, scheduler = build_model(config, accelerator, self.init_adapter,
                                                           optimizer_trains_policy=updater.needs["policy_optimizer"],
                                                           base=self.base_model)
            self.optimizer, self.scheduler = optimizer, scheduler
            check_sequence_fits(self.unwrapped.policy.config, config.max_prompt_length, config.max_new_tokens)
            check_tokenizer_fits(self.unwrapped.policy, self.tokenizer)
            if self.base_model is None:
                # Adapters name their base as given (the embedded model by its registered name, a hub id),
                # not the dir it was loaded from here (a cache path of this machine): they load elsewhere.
                self.unwrapped.policy.peft_config["default"].base_model_name_or_path = config.model_name_or_path

            self.estimator = estimator
            self.updater = updater(model=self.model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
                                   config=config, policy_loss=POLICY_LOSSES[config.policy_loss], reducer=self.reducer,
                                   micro_batch_size=self.micro_batch_size)
            self.kl_controller = (
                AdaptiveKLController(config.kl_coef, config.adaptive_kl_target, config.adaptive_kl_horizon)
                if config.adaptive_kl_target else FixedKLController(config.kl_coef)
            )
            self.baseline = MovingAverageBaseline(config.baseline_decay)
            self.sampler = PromptSampler(len(self.dataset), config.rollout_batch_size, config.seed)
            self.step = 0
            self.lineage: lineage.Lineage | None = None  # the run and branch being trained (rlhf.lineage)
            self._stop: StopOnSignal | None = None  # while train() runs
            self.last_logged: dict[str, Any] | None = None  # the latest metrics row (for the model card)
            self.logged_columns: dict[str, list[Any]] = {}  # reward functions' log_extra, per step
            self.reward_columns: dict[str, list[float]] = {}  # each reward function's value per sample, per step
            self.raw_totals: list[float] = []  # each sample's reward before clipping/normalising, per step
        except BaseException:
            # a trainer that cannot be built hands the switches back too (a notebook goes on with glibc's default)
            release_freed_memory(stop_keeping=self._stops_keeping_freed_memory)
            ckpt.remove_created_dirs(self.output_dir, created_dir)
            raise
        self._created_dir = created_dir

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def old_logprobs_from_update(self) -> bool:
        """True when the update takes the old logprobs from its own forward (rlhf.experience.plan_passes)."""
        return not self.passes.old

    @property
    def consecutive_skips(self) -> int:
        return self.updater.consecutive_skips

    # ------------------------------------------------------------------------------ the loop

    def train(self, resume_from_checkpoint: str | bool | None = None) -> None:
        """Train to max_steps. ``resume_from_checkpoint`` (TRL's): a checkpoint dir, or True for the
        newest of this output_dir (``"latest"``); None or False: as the config says."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            self.config.resume_from_checkpoint = ("latest" if resume_from_checkpoint is True
                                                  else str(resume_from_checkpoint))
        self._check_other_run()
        try:
            with OutputDirLock(self.output_dir, enabled=self.accelerator.is_main_process), long_lived_objects_frozen():
                self._train()
        except BaseException as exc:
            if isinstance(exc, UserError) and self.step == 0 and self._created_dir is not None:
                # refused at its start in a dir it made (a checkpoint that does not load): the dirs go
                # again, as after a refusal in __init__ (no other run can hold a lock on a dir just made)
                (self.output_dir / LOCK_FILE).unlink(missing_ok=True)
                ckpt.remove_created_dirs(self.output_dir, self._created_dir)
            # a failed run (a reward function that raised, diverged training) hands back what the heap
            # kept too; the ends that went through _end_training did so already (until 2026-12-07 a
            # train() that raised left the process at its peak: 1.8 GB against 0.6 GB after a run)
            release_freed_memory(stop_keeping=self._stops_keeping_freed_memory)
            raise

    def _check_other_run(self) -> None:
        """Built with args=, output_dir holding another run is refused at the first write into it
        (train(), or save_model / save_checkpoint there), unless the run resumes or overwrites it."""
        if not self._other_run_checked:
            ckpt.refuse_other_run(self.output_dir, bool(self.config.resume_from_checkpoint),
                                  self.config.overwrite_output_dir)
            self._other_run_checked = True

    def _train(self) -> None:
        config, accelerator = self.config, self.accelerator
        self._start_run()
        progress = tqdm(range(self.step, config.max_steps), initial=self.step, total=config.max_steps,
                        disable=not accelerator.is_main_process, desc="rl")
        with StopOnSignal() as stop:
            self._stop = stop
            for _ in progress:
                at_step_start = RolloutState.capture(self.sampler)
                try:
                    metrics = self.train_step()
                except ScoringInterrupted:  # a signal while reward functions ran (they may hang)
                    # The abandoned step leaves no trace, so the resume runs it exactly as it would have run.
                    at_step_start.restore(self.sampler)
                    signum = int(self.reducer.max(float(stop.received or 0))) or signal.SIGINT
                    # A reward call given up on may still run and draw random numbers: the checkpoint
                    # holds the streams as the step found them, whatever happens to them meanwhile.
                    checkpoint = self.save_checkpoint(random_streams=at_step_start)
                    self._end_training()
                    raise TrainingInterrupted(signum, self.step, checkpoint, scoring=True) from None
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
                periodic = config.save_steps and self.step % config.save_steps == 0
                checkpoint = self.save_checkpoint() if periodic else None
                if self.consecutive_skips >= config.max_consecutive_skips:
                    checkpoint = checkpoint or self.save_checkpoint()
                    raise TrainingDiverged(
                        f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss, gradient or updated weights "
                        f"(up to step {self.step}); skipped updates leave the weights as they were, saved in "
                        f"{checkpoint}; lower learning_rate, set max_grad_norm, or check the reward values"
                    )
                signum = int(self.reducer.max(float(stop.received or 0)))
                if signum and self.step < config.max_steps:  # after the last step, just finish
                    checkpoint = checkpoint or self.save_checkpoint()
                    self._end_training()
                    raise TrainingInterrupted(signum, self.step, checkpoint)
            # Inside the handler: a signal now lets the final save complete instead of killing it
            # half-way (with save_steps 0 it is the only copy of the run).
            before_save = stop.received  # one after the last step just lets the run finish, as before
            final = self.save_final()
            signum = int(self.reducer.max(float(stop.received if stop.received != before_save else 0)))
        self._end_training()
        if config.push_to_hub and accelerator.is_main_process:  # after the local save: a failed upload loses nothing
            from rlhf.hub import push_folder

            repo = config.hub_model_id or self.output_dir.name
            accelerator.print(f"pushed {final} to {push_folder(final, repo, config.hub_private_repo)}")
        if signum:
            raise TrainingInterrupted(signum, self.step, final, finished=True)

    def _end_training(self) -> None:
        """Close the trackers and the process group. The DDP wrapper goes first, on every process
        together: freed after the process group (when the trainer is), its reducer's release of
        the group could hang a process in gloo's teardown (seen once in 2-process CI)."""
        import gc

        self.accelerator.wait_for_everyone()
        plain = self.unwrapped
        self.model = self.updater.model = plain
        self.accelerator.free_memory()  # Accelerate's own references to the prepared model
        thaw_long_lived_objects()  # the wrapper was made before training: frozen objects are never collected
        gc.collect()
        # what the heap kept for the steps' reuse goes back to the system, and glibc's own thresholds to the process
        release_freed_memory(stop_keeping=self._stops_keeping_freed_memory)
        self.accelerator.end_training()

    def train_step(self) -> dict[str, float]:
        """One RL step: rollout -> score -> make_experience -> update, then evaluation and logging."""
        config, clock = self.config, time.perf_counter
        step_start = clock()
        score_seconds = []
        self.logged_columns, self.reward_columns, self.raw_totals = {}, {}, []

        def timed_score(rollout: Rollout) -> tuple[Tensor, Tensor | None, dict[str, float]]:
            start = clock()
            scored = self.score(rollout)
            score_seconds.append(clock() - start)
            return scored

        if config.dynamic_sampling:
            rollout, scores, token_scores, reward_metrics = sample_with_spread(
                self.rollout, timed_score, self.config.rollout_batch_size // self.accelerator.num_processes,
                config.dynamic_sampling_max_rounds, self.reducer, self.tokenizer.pad_token_id)
        else:
            rollout = self.rollout()
            scores, token_scores, reward_metrics = timed_score(rollout)
        score_time = sum(score_seconds)
        rollout_time = clock() - step_start - score_time
        experience_metrics: dict[str, float] = {}
        logprob_time = 0.0
        update_start = clock()
        if reward_metrics.get("reward_errors", 0) and config.reward_error == "skip_batch":
            warnings.warn(f"step {self.step + 1}: {int(reward_metrics['reward_errors'])} reward failures; "
                          "batch skipped (reward_error: skip_batch)", stacklevel=2)
            update_metrics = {"skipped_batches": 1.0}
            advantages = None
        else:
            batch, experience_metrics = self.make_experience(rollout, scores, token_scores)
            advantages = batch.advantages
            logprob_time = clock() - update_start  # old/reference logprobs and values: no-grad passes
            update_start = clock()
            update_metrics = self.update(batch)
        if rollout.sampled_products is not None:  # the weights have moved on: the sampler's products are spent
            rollout.sampled_products.release()
        update_time = clock() - update_start
        self.step += 1

        step_time = clock() - step_start
        logged_by_rewards = reward_metrics.pop(LOGGED_BY_REWARDS, [])
        episodes: dict[str, float] = {}
        if rollout.episodes is not None:  # turns, tool calls and failures, episode lengths (global)
            from rlhf.episodes import episode_metrics

            episodes = episode_metrics(rollout.episodes, lambda values: self.reducer.sum(values).tolist())
        metrics = {**experience_metrics, **update_metrics,
                   **throughput(rollout, self.reducer, step_time, rollout_time, update_time),
                   "score_time_s": score_time, "logprob_time_s": logprob_time}
        for name in logged_by_rewards:  # names logged later too: the KL, the row's step, evaluations
            if name in metrics or name in episodes or name in ("kl", "step") or name.startswith("eval/"):
                raise logged_over_a_trainer_metric(name)
        metrics = {**reward_metrics, **episodes, **metrics}
        metrics.setdefault("kl", math.nan)
        if math.isfinite(metrics["kl"]):
            self.kl_controller.update(metrics["kl"], config.rollout_batch_size * config.num_generations)
        if config.eval_steps and (self.step % config.eval_steps == 0 or self.step == config.max_steps):
            metrics.update(self._evaluate_unless_interrupted())
        # What reward_mean counts: raw outcome + process rewards. Dynamic sampling scores several
        # rounds and keeps some rows, reordered: the update's scores (clipped/normalised) line up.
        totals = (torch.tensor(self.raw_totals) if not config.dynamic_sampling
                  else scores if token_scores is None else scores + token_scores.sum(-1))
        if self.step % config.logging_steps == 0 or self.step == config.max_steps:
            self.last_logged = {"step": self.step, **metrics_row(metrics)}
            self.accelerator.log(metrics_row(metrics), step=self.step)
            if self.accelerator.is_main_process and config.num_samples_to_log:
                # log_extra columns line up with the rows unless dynamic sampling drew several rounds
                extra = {k: v for k, v in self.logged_columns.items() if len(v) == len(rollout)}
                append_samples(self.output_dir / "samples.jsonl", self.step, rollout, totals, config.num_samples_to_log,
                               extra if not config.dynamic_sampling else {})
        if self.completion_tables and (self.step % (config.log_completions_steps or config.logging_steps) == 0
                                       or self.step == config.max_steps):
            self.log_completions(rollout, totals, advantages)
        return metrics

    @property
    def completion_tables(self) -> bool:
        """Completion tables go to W&B and TensorBoard (metrics.jsonl has samples.jsonl)."""
        return self.config.log_completions and any(t in self.config.report_to for t in ("tensorboard", "wandb"))

    def log_completions(self, rollout: Rollout, scores: Tensor, advantages: Tensor | None) -> None:
        """Every sample of the step, from all processes, as one table (TRL's log_completions)."""
        from accelerate.utils import gather_object

        # Dynamic sampling scores several rounds and keeps some of their rows, reordered: the
        # per-function values then no longer line up with the rows.
        columns = {} if self.config.dynamic_sampling else self.reward_columns
        rows = gather_object(completion_rows(rollout, scores.tolist(), columns, advantages))
        if self.accelerator.is_main_process:
            log_completions(self.accelerator.trackers, rows, self.step)

    def rollout(self) -> Rollout:
        """Sample num_generations responses for this process's share of the next prompt batch.

        Every process draws the same global batch and takes a contiguous slice of prompts, so the
        samples of one prompt (a group) never straddle processes.
        """
        indices = self.sampler.next_batch()
        per_process = len(indices) // self.accelerator.num_processes
        start = self.accelerator.process_index * per_process
        return self._generate(self.dataset, indices[start:start + per_process], self.config.num_generations,
                              group_offset=start)

    def _generate(self, dataset: Any, indices: list[int], num_generations: int, group_offset: int = 0) -> Rollout:
        return sample_rollout(self.model, self.accelerator, self.tokenizer, dataset, indices, self.config,
                              num_generations, group_offset, eos_token_ids=self.stop_ids, episodes=self.episodes)

    def score(self, rollout: Rollout) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        return score(self.reward, rollout, self.config, self.reducer, self.step + 1, self.tokenizer,
                     logged_columns=self.logged_columns, reward_columns=self.reward_columns, raw_totals=self.raw_totals,
                     abandonable=self._stop.abandonable if self._stop is not None else nullcontext)

    def make_experience(self, rollout: Rollout, scores: Tensor,
                        token_scores: Tensor | None = None) -> tuple[Experience, dict[str, float]]:
        return make_experience(self.model, rollout, scores, config=self.config, passes=self.passes,
                               estimator=self.estimator, kl_coef=self.kl_controller.value, baseline=self.baseline,
                               reducer=self.reducer, micro_batch_size=self.micro_batch_size, token_scores=token_scores)

    def update(self, batch: Experience) -> dict[str, float]:
        with transposed_weights_kept(self.model):  # the backward's products with frozen weights, on a CPU
            metrics = self.updater(batch, self.kl_controller.value)
        if metrics.get("empty_updates"):
            warnings.warn(f"step {self.step + 1}: every response was left out of the loss (every reward function "
                          "returned None for them, all groups without reward spread dropped, or all cut off at "
                          "max_new_tokens with mask_truncated_completions); no update this step", stacklevel=2)
        if metrics.get("skipped_steps"):
            warnings.warn(f"step {self.step + 1}: skipped {int(metrics['skipped_steps'])} optimizer step(s) with a "
                          f"non-finite loss, gradient or updated weights ({self.consecutive_skips} in a row)", stacklevel=2)
        return metrics

    def _evaluate_unless_interrupted(self) -> dict[str, float]:
        """The periodic evaluation; a signal during it gives it up (the step's update is done and
        kept: the loop then saves a checkpoint of this step and stops), with no eval metrics."""
        if self._stop is None:
            return self.evaluate()
        stop = self._stop
        results, interrupted = run_abandonable(
            self.evaluate, lambda: stop.abandonable("the evaluation (the step itself is complete)"), self.reducer.max)
        if interrupted:
            warnings.warn(f"step {self.step}: evaluation abandoned by a signal; no eval metrics this step",
                          stacklevel=2)
            return {}
        return results

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward and KL to the reference on the first eval_num_prompts eval prompts.

        Uses rlhf.evaluate's seeded sampling: the same prompts and draws at every evaluation (so
        steps are comparable), and the training run's random stream is left untouched.
        """
        config, accelerator = self.config, self.accelerator
        count = min(config.eval_num_prompts, len(self.eval_dataset))
        local = list(range(count))[accelerator.process_index::accelerator.num_processes]
        self.model.eval()
        with unwrapped_full_weights(self.model, accelerator) as model:
            records = sample_and_score(
                model.policy, self.tokenizer, self.eval_dataset, local, self.reward,
                base=lambda: adapter_disabled(model.policy), seed=config.seed, max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, top_p=config.top_p, max_prompt_length=config.max_prompt_length,
                prompt_column=config.prompt_column, eos_token_ids=self.stop_ids,
                reward_extras={"trainer_state": RewardTrainerState(self.step, config.max_steps)},
                batch_size=config.generation_batch_size or config.rollout_batch_size * config.num_generations // accelerator.num_processes,
                episodes=self.episodes, speedups=not shards_weights(accelerator),
                share_prompt_prefix=model.share_prompt_prefix,
            )
        reward_sum, kl_sum, evaluated = self.reducer.sum(
            [sum(r["reward"] for r in records), sum(r["kl"] for r in records), float(len(records))]).tolist()
        metrics = {"eval/reward_mean": reward_sum / evaluated, "eval/kl": kl_sum / evaluated}
        if self.episodes is not None:  # tool use on the eval prompts, named as training's (episode_metrics)
            turns, calls, failures, truncated = self.reducer.sum(
                [float(sum(r[key] for r in records)) for key in ("turns", "tool_calls", "tool_failures", "truncated")]
            ).tolist()
            metrics.update({"eval/turns_mean": turns / evaluated, "eval/tools/call_frequency": calls / evaluated,
                            "eval/tools/failure_frequency": failures / calls if calls else 0.0,
                            "eval/episodes_truncated": truncated / evaluated})
        return metrics

    # ------------------------------------------------------------------------------ run state, saving

    def _start_run(self) -> None:
        """Resume the checkpoint on this run's branch (or start at step 0), then record the branch;
        nothing is written before the checkpoint has loaded, so a refused resume changes nothing."""
        config, accelerator = self.config, self.accelerator
        start = lineage.plan_start(self.output_dir, config.resume_from_checkpoint)
        if start.restart:
            accelerator.print(f"no complete checkpoint of this run in {self.output_dir / 'checkpoints'} yet; "
                              "starting from step 0")
        changed = changed_settings(self.output_dir / "config.yaml", config) if start.checkpoint else []
        if start.checkpoint is not None:
            self._resume(start.checkpoint)
        accelerator.wait_for_everyone()  # every process has read the old state before it changes
        if accelerator.is_main_process:
            lineage.apply_start(self.output_dir, start, config.overwrite_output_dir and not config.resume_from_checkpoint,
                                say=accelerator.print)
            save_config(config, self.output_dir / "config.yaml")
        accelerator.wait_for_everyone()
        self.lineage = start.lineage
        self.metrics_log.run_id = start.lineage.run_id
        if start.checkpoint is not None:
            accelerator.print(f"resumed from {start.checkpoint} at step {self.step}")
            if changed:  # the checkpoint's compatibility check refused the settings that change what is trained
                accelerator.print(f"resuming with changed settings: {', '.join(changed)}")
        for tracker in self.trackers:  # TensorBoard drops the events of steps after the resumed one
            if tracker.name == "tensorboard" and start.checkpoint is not None:
                tracker.init_kwargs["purge_step"] = self.step + 1
        # The resolved config, with the names the trackers use.
        accelerator.init_trackers(self.project_name, config={**flat_config(config), "project_name": self.project_name,
                                                             "run_name": self.run_name})

    def trainer_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "consecutive_skips": self.consecutive_skips,
            "kl_controller": self.kl_controller.state_dict(),
            "baseline": self.baseline.state_dict(),
            "sampler": self.sampler.state_dict(),
            "python_rng": ckpt.encode_python_rng(random.getstate()),
            "compatibility": ckpt.compatibility(self.config),
        }
        entropy_control = getattr(self.updater, "entropy_control", None)  # the optimizer update's entropy bonus
        if entropy_control is not None and entropy_control.adaptive:
            state["entropy_controller"] = entropy_control.state_dict()
        if self.lineage is not None:
            state["lineage"] = self.lineage.to_dict()
        return state

    def _resume(self, path: Path) -> None:
        unwrapped = self.unwrapped
        state = ckpt.load_checkpoint(self.accelerator, unwrapped.policy, unwrapped.value_head, path, ckpt.compatibility(self.config))
        if self.optimizer is not None:  # the checkpoint's saved AdamW settings name its kernel: this run's instead
            use_fused_adamw(self.optimizer, fused_adamw(self.accelerator))
        self.step = int(state["step"])
        self.updater.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.baseline.load_state_dict(state["baseline"])
        entropy_control = getattr(self.updater, "entropy_control", None)
        if entropy_control is not None and entropy_control.adaptive and "entropy_controller" in state:
            entropy_control.load_state_dict(state["entropy_controller"])
        self.sampler.load_state_dict(state["sampler"])
        random.setstate(ckpt.decode_python_rng(state["python_rng"]))

    def save_checkpoint(self, random_streams: RolloutState | None = None) -> Path:
        """``random_streams``: save these instead of the current ones (an abandoned step's)."""
        self._check_other_run()
        unwrapped = self.unwrapped
        state = self.trainer_state()
        rank = self.accelerator.process_index
        if random_streams is not None:
            state["python_rng"] = ckpt.encode_python_rng(random_streams.python)
        return ckpt.save_checkpoint(
            self.accelerator, unwrapped.policy, unwrapped.value_head, state, self.output_dir / "checkpoints",
            self.step, self.config.save_total_limit, full_state=gathered_state(self.accelerator, self.model),
            init_adapter=self.init_adapter,
            after_state_saved=None if random_streams is None else lambda d: random_streams.write_into(d, rank),
            tokenizer=self.tokenizer)

    def save_final(self) -> Path:
        return self.save_model(self.output_dir / "final")

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the trained LoRA adapter (PEFT format, loadable with PeftModel.from_pretrained on
        the base), the value head if any, and the tokenizer to output_dir (default:
        output_dir/final), atomically: an existing dir is replaced only by a complete one."""
        target = Path(output_dir) if output_dir is not None else self.output_dir / "final"
        run_dir, into = Path(os.path.abspath(self.output_dir)), Path(os.path.abspath(target))
        if run_dir == into or run_dir in into.parents:
            self._check_other_run()  # never into another run's output_dir unawares (TRL's save_model before train)
        full_state = gathered_state(self.accelerator, self.model)
        unwrapped = self.unwrapped

        def write_adapter_and_tokenizer(staging: Path) -> None:
            ckpt.save_adapter_and_head(unwrapped.policy, unwrapped.value_head, staging, full_state, self.init_adapter)
            self.tokenizer.save_pretrained(staging)
            if self.lineage is not None:  # which run, branch and step this adapter is
                (staging / lineage.FINAL_LINEAGE).write_text(lineage.final_lineage_file(self.lineage, self.step))
            # replaces peft's placeholder card
            (staging / "README.md").write_text(render_model_card(self.config.to_dict(), self.last_logged, self.step))

        saved = ckpt.write_atomically(self.accelerator, target, write_adapter_and_tokenizer)
        self.accelerator.wait_for_everyone()
        return saved
