"""The RL loop: rollout -> score -> advantages -> update, for every estimator and loss.

    for step in range(max_steps):
        rollout = self.rollout(prompt batch)          # sample responses (LoRA policy)
        scores  = self.score(rollout)                 # reward functions on the decoded text
        batch   = self.compute_advantages(rollout, scores)   # old/ref logprobs, values, KL, A, R
        stats   = self.update(batch)                  # ppo_epochs x shuffled minibatches
        log, save

The algorithm is chosen only through ``ADVANTAGE_ESTIMATORS[config.advantage_estimator]`` and
``POLICY_LOSSES[config.policy_loss]``; nothing here branches on their names.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import DistributedType, set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from reward_models import CombinedReward
from rlhf import checkpoint as ckpt
from rlhf.adapters import check_untied_targets, read_init_adapter
from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AdaptiveKLController, FixedKLController, MovingAverageBaseline,
    agg_loss, agg_units, declared_kwargs, group_stats, kl_penalty, masked_whiten, token_level_rewards, value_loss,
    zero_spread_groups,
)
from rlhf.config import RLConfig, save_config
from rlhf.data import BUILTIN_PREFIX, PromptSampler, format_prompt, load_prompt_dataset, prompt_text
from rlhf.distributed import make_accelerator, needs_synced_generation, shards_weights, unwrapped_full_weights
from rlhf.errors import ConfigError, DataError, TrainingDiverged
from rlhf.evaluate import adapter_disabled, sample_and_score
from rlhf.models import (
    PolicyWithValue, ValueHead, add_lora, check_bf16, load_base_model, load_tokenizer, merge_adapter,
    fuse_lora_layers, merged_lora_weights, trainable_parameter_groups,
)
from rlhf.rollout import Rollout, concat_rollouts, forward_response, generate_rollout
from rlhf.signals import StopOnSignal, TrainingInterrupted
from rlhf.tracking import METRIC_KEYS, JSONLTracker, truncate_metrics
from rlhf.trpo import trpo_step

# Distinct sampling streams per process (RL_NOTES 5): a large prime keeps seeds of ranks apart.
RANK_SEED_STRIDE = 100003


@dataclass
class Experience:
    """A scored rollout with everything the update needs; all [B, T] unless noted."""

    rollout: Rollout
    old_logprobs: Tensor | None  # None: taken from the update's own forward (old_logprobs_from_update)
    ref_logprobs: Tensor | None
    values: Tensor | None
    advantages: Tensor
    returns: Tensor
    loss_mask: Tensor  # rollout.mask without the rows of dropped (zero-spread) groups


class RLTrainer:
    def __init__(self, config: RLConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        trackers = [t for t in config.report_to if t in ("tensorboard", "wandb")]
        self.accelerator = make_accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=[JSONLTracker("rlhf", self.output_dir), *trackers],
            project_dir=str(self.output_dir),
            # We step the scheduler once per optimizer step ourselves; Accelerate would step it
            # once per process, assuming sharded dataloaders.
            step_scheduler_with_optimizer=False,
        )
        config.check_world_size(self.accelerator.num_processes)
        # Derived once: sequences per forward pass on this process (no-grad passes use it too).
        self.micro_batch_size = config.mini_batch_size // (self.accelerator.num_processes
                                                           * config.gradient_accumulation_steps)
        self._configure_sharding()
        self._check_output_dir()
        set_seed(config.seed + self.accelerator.process_index * RANK_SEED_STRIDE)

        self.dataset = load_prompt_dataset(config.dataset, config.dataset_split, config.prompt_column)
        self.eval_dataset = self._load_eval_dataset() if config.eval_steps else None
        self.reward = CombinedReward(config.reward_funcs, config.reward_weights, config.reward_kwargs,
                                     device=self.accelerator.device, on_error=config.reward_error)
        self.tokenizer = load_tokenizer(config.model_name_or_path)
        self._check_prompt_lengths(self.dataset, config.dataset)
        if config.bf16:
            check_bf16(self.accelerator.device)
        # Read (and refused if it cannot be saved with the RL LoRA) before any model loads, so final/
        # and checkpoints can hold init + RL as one adapter of the original base (rlhf.adapters).
        self.init_adapter = read_init_adapter(config.init_adapter) if config.init_adapter else None
        with self.accelerator.main_process_first():  # the embedded model is converted once, by rank 0
            base = load_base_model(config.model_name_or_path, bf16=config.bf16)
        if config.init_adapter:
            check_untied_targets(self.init_adapter, base, config.init_adapter)
            base = merge_adapter(base, config.init_adapter)
        if config.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # With a frozen base nothing before the first LoRA layer needs grad; the embedding
            # output must, or checkpointed blocks could return activations without a graph.
            base.enable_input_require_grads()
        if config.lora_dropout > 0 and self.accelerator.is_main_process:
            warnings.warn(f"lora_dropout {config.lora_dropout} is ignored: RL trains with every dropout off, so the "
                          "update's logprobs are those of the policy that sampled (RL_NOTES 15); the saved adapter "
                          "records lora_dropout 0", stacklevel=2)
        policy = add_lora(base, config.lora_r, config.lora_alpha, 0.0, config.lora_target_modules)
        if not shards_weights(self.accelerator):
            fuse_lora_layers(policy)
        value_head = ValueHead(base.config.hidden_size) if config.needs_value_head else None
        # Sharing runs the policy twice in one forward with a cache: fine for DDP, not for sharding
        # hooks; checkpointed layers switch the cache off.
        share_prompt_prefix = (config.share_prompt_prefix and not config.gradient_checkpointing
                               and not shards_weights(self.accelerator))
        model = PolicyWithValue(policy, value_head, share_prompt_prefix=share_prompt_prefix)
        param_groups = trainable_parameter_groups(model, config.learning_rate, config.value_learning_rate,
                                                  config.weight_decay)
        if self.uses_trpo:  # the policy moves by natural-gradient steps; AdamW only fits the value head
            param_groups = param_groups[1:]
        optimizer = torch.optim.AdamW(param_groups) if param_groups else None
        updates_per_step = config.ppo_epochs * config.rollout_batch_size * config.num_generations // config.mini_batch_size
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=config.max_steps * updates_per_step) if optimizer else None
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        ckpt.skip_model_weights_in_accelerate_state(self.accelerator)

        self.estimator = ADVANTAGE_ESTIMATORS[config.advantage_estimator]
        self.policy_loss = POLICY_LOSSES[config.policy_loss]
        self.kl_controller = (
            AdaptiveKLController(config.kl_coef, config.adaptive_kl_target, config.adaptive_kl_horizon)
            if config.adaptive_kl_target else FixedKLController(config.kl_coef)
        )
        self.baseline = MovingAverageBaseline(config.baseline_decay)
        self.sampler = PromptSampler(len(self.dataset), config.rollout_batch_size, config.seed)
        self.step = 0
        self.consecutive_skips = 0  # optimizer steps in a row skipped for a non-finite loss/gradient

    def _configure_sharding(self) -> None:
        """DeepSpeed and FSDP (configs/accelerate/deepspeed_*.yaml, fsdp.yaml) take their batch
        sizes and clipping from the run config; what they cannot do is refused here."""
        config, accelerator = self.config, self.accelerator
        if accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return
        backend = "DeepSpeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else "FSDP"
        if config.update_method == "trpo":
            raise ConfigError(f"update_method trpo needs unsharded LoRA weights for its natural-gradient step; "
                              f"run it without {backend} (e.g. configs/accelerate/multi_gpu.yaml)")
        if config.bf16:
            raise ConfigError(f"with {backend} set mixed_precision: bf16 in the accelerate config and keep --bf16 false "
                              "(it keeps float32 master weights; a bfloat16 base would mix dtypes in one shard)")
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # No dataloader goes through prepare(), so DeepSpeed cannot infer these ("auto").
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = self.micro_batch_size
            ds_config["gradient_accumulation_steps"] = config.gradient_accumulation_steps
            ds_config["train_batch_size"] = config.mini_batch_size
            ds_config["gradient_clipping"] = config.max_grad_norm or 0.0

    # ------------------------------------------------------------------------------ helpers

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def uses_trpo(self) -> bool:
        return self.config.update_method == "trpo"

    @property
    def old_logprobs_from_update(self) -> bool:
        """With one epoch and one minibatch the policy is still the rollout's policy when the
        update's forward runs, so the old logprobs are exactly that forward's detached logprobs
        (ratio 1, the same gradient) and the separate no-grad pass is skipped. It is needed when
        values feed GAE, when KL to the reference goes into the reward, and for TRPO."""
        config = self.config
        single_update = (config.ppo_epochs == 1
                         and config.mini_batch_size == config.rollout_batch_size * config.num_generations)
        return (single_update and not self.uses_trpo and not config.needs_value_head
                and not (self.uses_reference and config.kl_in_reward))

    @property
    def uses_reference(self) -> bool:
        return self.config.kl_coef > 0 or self.config.adaptive_kl_target is not None

    def _check_output_dir(self) -> None:
        """Never write over another run's results (a resumed run continues its own)."""
        config = self.config
        try:  # fail now, not after the first step's compute
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / f".write-test-{self.accelerator.process_index}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"output_dir {self.output_dir} is not writable ({exc.strerror or exc}); "
                              "choose another --output_dir") from None
        existing = [p for p in ("metrics.jsonl", "final", "checkpoints") if (self.output_dir / p).exists()]
        if existing and not config.resume_from_checkpoint and not config.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {self.output_dir} already holds a run ({', '.join(existing)}); choose another output_dir, "
                "resume it with --resume_from_checkpoint latest, or pass --overwrite_output_dir true"
            )

    def _check_prompt_lengths(self, dataset: Any, name: str) -> None:
        """Count prompts that max_prompt_length cuts (their beginning would silently disappear)."""
        config = self.config
        texts = [format_prompt(p, self.tokenizer) for p in dataset[config.prompt_column]]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        too_long = [i for i, length in enumerate(lengths) if length > config.max_prompt_length]
        if not too_long:
            return
        first = f"first: row {too_long[0]}, {lengths[too_long[0]]} tokens"
        if config.prompt_overflow == "error":
            raise DataError(f"{len(too_long)} of {len(lengths)} prompts in {name} are longer than max_prompt_length "
                            f"{config.max_prompt_length} tokens ({first}); raise max_prompt_length or set "
                            "prompt_overflow: truncate")
        if self.accelerator.is_main_process:
            warnings.warn(f"{len(too_long)} of {len(lengths)} prompts in {name} are longer than max_prompt_length "
                          f"{config.max_prompt_length} tokens ({first}) and lose their beginning; raise "
                          "max_prompt_length, or set prompt_overflow: error to refuse them", stacklevel=2)

    def _load_eval_dataset(self) -> Any:
        config = self.config
        if config.eval_dataset:
            return load_prompt_dataset(config.eval_dataset, config.dataset_split, config.prompt_column)
        if config.dataset.startswith(BUILTIN_PREFIX):
            return load_prompt_dataset(config.dataset, "eval", config.prompt_column)
        raise ConfigError("eval_steps > 0 needs eval_dataset (a prompt file) when dataset is not built in")

    def _global_mean(self, value: float | Tensor) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def _global_max(self, value: float) -> float:
        tensor = torch.tensor(value, dtype=torch.float32, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="max")) if self.accelerator.num_processes > 1 else value

    def _global_token_mean(self, x: Tensor, mask: Tensor) -> float:
        """Mean over every response token of every process (processes may hold different token counts)."""
        total, count = self._global_sum(torch.stack([(x * mask).sum(), mask.sum()])).tolist()
        return total / max(count, 1.0)

    def _global_sum(self, value: float | Tensor) -> Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device)
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    # ------------------------------------------------------------------------------ the loop

    def train(self) -> None:
        config, accelerator = self.config, self.accelerator
        self._start_run()
        progress = tqdm(range(self.step, config.max_steps), initial=self.step, total=config.max_steps,
                        disable=not accelerator.is_main_process, desc="rl")
        with StopOnSignal() as stop:
            for _ in progress:
                metrics = self.train_step()
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
                periodic = config.save_steps and self.step % config.save_steps == 0
                checkpoint = self.save_checkpoint() if periodic else None
                if self.consecutive_skips >= config.max_consecutive_skips:
                    checkpoint = checkpoint or self.save_checkpoint()
                    raise TrainingDiverged(
                        f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                        f"(up to step {self.step}); skipped updates leave the weights as they were, saved in "
                        f"{checkpoint}; lower learning_rate, set max_grad_norm, or check the reward values"
                    )
                signum = int(self._global_max(float(stop.received or 0)))
                if signum and self.step < config.max_steps:  # after the last step, just finish
                    checkpoint = checkpoint or self.save_checkpoint()
                    accelerator.end_training()
                    raise TrainingInterrupted(signum, self.step, checkpoint)
        self.save_final()
        accelerator.end_training()

    def train_step(self) -> dict[str, float]:
        """One RL step: rollout -> score -> advantages -> update, then evaluation and logging."""
        config = self.config
        clock = time.perf_counter
        step_start = clock()
        rollout = self.rollout()
        rollout_time = clock() - step_start
        scores, reward_metrics = self.score(rollout)
        score_time = clock() - step_start - rollout_time
        advantage_metrics: dict[str, float] = {}
        logprob_time = 0.0
        update_start = clock()
        if reward_metrics.get("reward_errors", 0) and config.reward_error == "skip_batch":
            warnings.warn(f"step {self.step + 1}: {int(reward_metrics['reward_errors'])} reward failures; "
                          "batch skipped (reward_error: skip_batch)", stacklevel=2)
            update_metrics = {"skipped_batches": 1.0}
        else:
            batch, advantage_metrics = self.compute_advantages(rollout, scores)
            logprob_time = clock() - update_start  # old/reference logprobs and values: no-grad passes
            update_start = clock()
            update_metrics = self.update(batch)
        update_time = clock() - update_start
        self.step += 1

        step_time = clock() - step_start
        metrics = {**reward_metrics, **advantage_metrics, **update_metrics,
                   **self._throughput(rollout, step_time, rollout_time, update_time),
                   "score_time_s": score_time, "logprob_time_s": logprob_time}
        metrics.setdefault("kl", math.nan)
        if math.isfinite(metrics["kl"]):
            self.kl_controller.update(metrics["kl"], config.rollout_batch_size * config.num_generations)
        if config.eval_steps and (self.step % config.eval_steps == 0 or self.step == config.max_steps):
            metrics.update(self.evaluate())
        if self.step % config.logging_steps == 0 or self.step == config.max_steps:
            self._log(metrics, rollout, scores)
        return metrics

    def _start_run(self) -> None:
        config, accelerator = self.config, self.accelerator
        restart = (config.resume_from_checkpoint == "latest" and (self.output_dir / "config.yaml").is_file()
                   and not ckpt.list_checkpoints(self.output_dir / "checkpoints"))
        if restart:  # this run was killed before its first checkpoint: nothing to load, start over
            accelerator.print(f"no complete checkpoint in {self.output_dir / 'checkpoints'} yet; starting from step 0")
        elif config.resume_from_checkpoint:
            self._resume(ckpt.resolve_checkpoint(config.resume_from_checkpoint, self.output_dir))
            self._report_changed_settings()
        if (restart or (config.overwrite_output_dir and not config.resume_from_checkpoint)) and accelerator.is_main_process:
            for name in ("metrics.jsonl", "samples.jsonl"):  # a fresh run must not append to old rows
                (self.output_dir / name).unlink(missing_ok=True)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
        accelerator.init_trackers(
            "rlhf", config=_flat_config(config),
            init_kwargs={"wandb": {"dir": str(self.output_dir), "name": self.output_dir.name}},
        )

    def _report_changed_settings(self) -> None:
        """Settings that do not change what is trained (logging, saving, max_steps ...) may change
        on resume (the compatibility check in the checkpoint refuses the others); say which did."""
        previous_file = self.output_dir / "config.yaml"
        if not previous_file.is_file():
            return
        previous = yaml.safe_load(previous_file.read_text()) or {}
        current = self.config.to_dict()
        changed = [f"{key} {previous[key]!r} -> {current[key]!r}" for key in current
                   if key in previous and previous[key] != current[key] and key != "resume_from_checkpoint"]
        if changed:
            self.accelerator.print(f"resuming with changed settings: {', '.join(changed)}")

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
        config = self.config
        rows = dataset.select(indices)
        raw_prompts = [p for p in rows[config.prompt_column] for _ in range(num_generations)]
        columns = {name: [v for v in rows[name] for _ in range(num_generations)]
                   for name in rows.column_names if name != config.prompt_column}
        group_ids = [group_offset + i for i in range(len(indices)) for _ in range(num_generations)]
        chunk = config.generation_batch_size or len(raw_prompts)
        self.model.eval()
        parts = []
        with unwrapped_full_weights(self.model, self.accelerator) as model, self._sampling_policy(model) as policy:
            for start in range(0, len(raw_prompts), chunk):
                part = slice(start, start + chunk)
                parts.append(generate_rollout(
                    policy, self.tokenizer, [format_prompt(p, self.tokenizer) for p in raw_prompts[part]],
                    prompts=[prompt_text(p) for p in raw_prompts[part]], group_ids=group_ids[part],
                    columns={name: values[part] for name, values in columns.items()},
                    max_prompt_length=config.max_prompt_length, max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature, top_p=config.top_p,
                    synced_gpus=needs_synced_generation(self.accelerator),
                    share_prompt_prefix=model.share_prompt_prefix,
                ))
        return concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _sampling_policy(self, model: PolicyWithValue) -> contextlib.AbstractContextManager[Any]:
        """LoRA folded into the weights while sampling (rlhf.models.merged_lora_weights), except
        where DeepSpeed/FSDP own the weight tensors."""
        if shards_weights(self.accelerator):
            return contextlib.nullcontext(model.policy)
        return merged_lora_weights(model.policy)

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
                prompt_column=config.prompt_column,
                batch_size=config.generation_batch_size or config.rollout_batch_size * config.num_generations // accelerator.num_processes,
            )
        reward_sum, kl_sum, evaluated = self._global_sum(
            [sum(r["reward"] for r in records), sum(r["kl"] for r in records), float(len(records))]).tolist()
        return {"eval/reward_mean": reward_sum / evaluated, "eval/kl": kl_sum / evaluated}

    def score(self, rollout: Rollout) -> tuple[Tensor, dict[str, float]]:
        """Sequence scores [B] from the reward functions, minus the no-EOS penalty if set."""
        output = self.reward(rollout.prompts, rollout.completions, **rollout.columns)
        device = rollout.mask.device
        scores = torch.tensor(output.total, dtype=torch.float32, device=device)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~rollout.eos_found).float()
        all_scores = self.accelerator.gather(scores)
        errors = float(self._global_sum(float(sum(output.failed))))
        if errors and self.config.reward_error == "zero":
            warnings.warn(f"step {self.step + 1}: {int(errors)} samples failed a reward function and score 0 "
                          "(reward_error: zero)", stacklevel=2)
        metrics = {"reward_errors": errors, "reward_mean": float(all_scores.mean()),
                   "reward_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0}
        for name, values in output.components.items():
            metrics[f"reward/{name}"] = self._global_mean(torch.tensor(values).mean())
        # reward_mean/std above stay raw so runs stay comparable; the update sees the shaped scores.
        if self.config.reward_clip is not None:
            metrics["reward_clip_frac"] = float((all_scores.abs() > self.config.reward_clip).float().mean())
            scores = scores.clamp(-self.config.reward_clip, self.config.reward_clip)
            all_scores = all_scores.clamp(-self.config.reward_clip, self.config.reward_clip)
        if self.config.normalize_rewards:
            scores = (scores - all_scores.mean()) / (all_scores.std() + 1e-6) if all_scores.numel() > 1 else scores * 0
        return scores, metrics

    @torch.no_grad()
    def compute_advantages(self, rollout: Rollout, scores: Tensor) -> tuple[Experience, dict[str, float]]:
        """Old and reference logprobs, values, per-token rewards with KL, and advantages."""
        config = self.config
        if self.old_logprobs_from_update:
            old_logprobs, values, entropy = None, None, None
        else:
            old_logprobs, values, entropy = self._no_grad_pass(rollout, with_adapter=True, with_entropy=True)
        ref_logprobs = self._no_grad_pass(rollout, with_adapter=False)[0] if self.uses_reference else None
        mask = rollout.mask
        loss_mask, group_metrics = self._group_filter(scores, rollout)
        kl = (kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator, mask)
              if ref_logprobs is not None and old_logprobs is not None else None)
        in_reward_coef = self.kl_controller.value if config.kl_in_reward else 0.0
        token_rewards = token_level_rewards(scores, mask, kl=kl, kl_coef=in_reward_coef)
        advantages, returns = self.estimator(token_rewards, mask, **declared_kwargs(self.estimator, dict(
            values=values, group_ids=rollout.group_ids, gamma=config.gamma, lam=config.lam,
            baseline=self.baseline.value, all_reduce=self._global_sum,
        )))
        self.baseline.update(self.accelerator.gather(returns[:, 0]))
        if config.whiten_advantages:
            advantages = self._global_whiten(advantages, loss_mask)
        metrics = {
            **group_metrics,
            "adv_mean": self._global_token_mean(advantages, mask),
            "kl_coef": self.kl_controller.value,
        }
        if old_logprobs is not None:  # else the update measures both on the same forward
            metrics["kl"] = self._global_mean(kl.sum(-1).mean()) if kl is not None else math.nan
            metrics["entropy"] = self._global_token_mean(entropy, mask)
        return Experience(rollout, old_logprobs, ref_logprobs, values, advantages, returns, loss_mask), metrics

    def _group_filter(self, scores: Tensor, rollout: Rollout) -> tuple[Tensor, dict[str, float]]:
        """Groups (samples of one prompt) whose scores are all equal get zero group-relative
        advantage: count them, and with filter_zero_std_groups drop them from the update."""
        if self.config.num_generations < 2:
            return rollout.mask, {}
        zero_spread = zero_spread_groups(scores, rollout.group_ids)
        counts = group_stats(scores, rollout.group_ids)[1]
        # Each group lives on one process, so per-process group counts add up (a group of n
        # samples contributes n * 1/n).
        totals = self._global_sum(torch.stack([(zero_spread.float() / counts).sum(), (1.0 / counts).sum()]))
        metrics = {"frac_zero_std_groups": float(totals[0] / totals[1])}
        if not self.config.filter_zero_std_groups:
            return rollout.mask, metrics
        return rollout.mask * (~zero_spread).unsqueeze(-1).to(rollout.mask.dtype), metrics

    def _no_grad_pass(self, rollout: Rollout, with_adapter: bool,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Logprobs [B, T], values [B, T] | None, entropy [B, T] | None in micro-batches, no grad.

        with_adapter=False is the reference policy: the same weights with LoRA switched off, so
        there is one copy of the base model in memory.
        """
        chunk = self.config.logprob_batch_size or self.micro_batch_size
        logprobs, values, entropy = [], [], []
        with unwrapped_full_weights(self.model, self.accelerator) as model:
            for start in range(0, len(rollout), chunk):
                rows = slice(start, start + chunk)
                if with_adapter:
                    lp, v, h = forward_response(model, rollout, rows, self.config.temperature, with_entropy=with_entropy)
                    values.append(v)
                    entropy.append(h)
                else:
                    with model.policy.disable_adapter():
                        lp, _, _ = forward_response(model, rollout, rows, self.config.temperature)
                logprobs.append(lp)
        has_values = with_adapter and model.value_head is not None
        return (torch.cat(logprobs), torch.cat(values) if has_values else None,
                torch.cat(entropy) if with_adapter and with_entropy else None)

    def _global_whiten(self, x: Tensor, mask: Tensor) -> Tensor:
        """masked_whiten with mean and variance over all processes (TRL whitens per rank, RL_NOTES 10)."""
        return masked_whiten(x, mask, all_reduce=self._global_sum)

    # ------------------------------------------------------------------------------ update

    def update(self, batch: Experience) -> dict[str, float]:
        """ppo_epochs passes of shuffled minibatches; one optimizer step per minibatch."""
        if self.uses_trpo:
            return self._trpo_update(batch)
        config, accelerator = self.config, self.accelerator
        rollout = batch.rollout
        local_minibatch = config.mini_batch_size // accelerator.num_processes
        micro = self.micro_batch_size
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # grad_norm exists only on the micro-batch that steps
        minibatches = 0
        self.model.train()
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(rollout), device=rollout.mask.device)
            for start in range(0, len(rollout), local_minibatch):
                minibatch = order[start:start + local_minibatch]
                normaliser = self._global_sum(self._agg_units(batch.loss_mask[minibatch]))
                if float(normaliser) == 0:  # every row dropped by filter_zero_std_groups, on all processes
                    continue
                minibatches += 1
                for micro_start in range(0, len(minibatch), micro):
                    rows = minibatch[micro_start:micro_start + micro]
                    for key, value in self._micro_step(batch, rows, normaliser).items():
                        sums[key] = sums.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
        self.model.eval()
        skipped = sums.pop("skipped_steps", 0.0)  # a count (the same on every process), not a mean
        # Token and sequence means over every process (micro-batches hold different token counts).
        totals = {key: sums.pop(key) for key in ("entropy_sum", "response_tokens", "kl_sum", "sequences") if key in sums}
        shares = {key: sums.pop(key) for key in ("policy_loss", "value_loss", "kl_loss") if key in sums}
        for key in ("skipped_steps", *totals, *shares):
            counts.pop(key, None)
        means = {key: self._global_mean(value / counts[key]) for key, value in sums.items()}
        if shares:  # the mean over minibatches of each minibatch's global loss
            means.update(zip(shares, (self._global_sum(list(shares.values())) / max(minibatches, 1)).tolist()))
        means["skipped_steps"] = skipped
        if totals:
            global_totals = dict(zip(totals, self._global_sum(list(totals.values())).tolist()))
            means["entropy"] = global_totals["entropy_sum"] / max(global_totals["response_tokens"], 1.0)
            if "kl_sum" in global_totals:
                means["kl"] = global_totals["kl_sum"] / max(global_totals["sequences"], 1.0)
        if skipped:
            warnings.warn(f"step {self.step + 1}: skipped {int(skipped)} optimizer step(s) with a non-finite "
                          f"loss or gradient ({self.consecutive_skips} in a row)", stacklevel=2)
        means.setdefault("value_loss", math.nan)
        means["learning_rate"] = self.scheduler.get_last_lr()[0]
        return means

    def _trpo_update(self, batch: Experience) -> dict[str, float]:
        """One natural-gradient step of the LoRA weights in the KL trust region (rlhf.trpo), then
        the value head (if any) fitted by AdamW on frozen features for ppo_epochs passes."""
        config, model, rollout = self.config, self.unwrapped, batch.rollout
        lora_params = [p for p in model.policy.parameters() if p.requires_grad]

        def policy_logprobs_full(rows: Tensor) -> Tensor:
            logits, _ = model(input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows],
                              position_ids=rollout.position_ids[rows], response_length=rollout.response_length)
            return torch.log_softmax(logits.float() / config.temperature, dim=-1)

        micro_batches = list(torch.arange(len(rollout), device=rollout.mask.device).split(self.micro_batch_size))
        fisher_rows = self._fisher_rows(len(rollout), rollout.mask.device)
        stats = trpo_step(
            lora_params, policy_logprobs_full, micro_batches, rollout.response_ids, batch.old_logprobs,
            batch.advantages, batch.loss_mask, max_kl=config.max_kl, cg_iters=config.cg_iters,
            cg_damping=config.cg_damping, line_search_backtracks=config.line_search_backtracks,
            line_search_accept_ratio=config.line_search_accept_ratio, loss_agg_mode=config.loss_agg_mode,
            norm_length=config.max_new_tokens, ref_logprobs=None if config.kl_in_reward else batch.ref_logprobs, kl_coef=self.kl_controller.value,
            kl_estimator=config.kl_estimator, fisher_rows=fisher_rows, all_reduce=lambda t: self._global_sum(t).to(t.dtype),
        )
        stats["approx_kl"] = stats["trpo/kl_after_step"]
        stats["value_loss"] = self._fit_value_head(batch) if model.value_head is not None else math.nan
        stats["learning_rate"] = self.scheduler.get_last_lr()[0] if self.scheduler is not None else math.nan
        return stats

    def _fisher_rows(self, local_rows: int, device: torch.device) -> Tensor:
        """This process's rows of the evenly spaced fisher_sample_fraction of the global rollout.

        Chosen on the global row numbers, so the Fisher estimate (and the step) does not depend on
        how the batch is split over processes."""
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        global_rows = local_rows * processes
        count = max(1, round(self.config.fisher_sample_fraction * global_rows))
        chosen = torch.linspace(0, global_rows - 1, count, device=device).round().long().unique()
        mine = chosen[(chosen >= rank * local_rows) & (chosen < (rank + 1) * local_rows)]
        return mine - rank * local_rows

    def _fit_value_head(self, batch: Experience) -> float:
        """Regress the value head on the returns with its own optimizer. The backbone is frozen
        here, so its features are computed once and the head's gradients are summed over
        processes by hand (there is no DDP backward)."""
        config, model, rollout, mask = self.config, self.unwrapped, batch.rollout, batch.loss_mask
        with torch.no_grad():
            hidden = torch.cat([
                model.response_hidden_states(rollout.input_ids[rows], rollout.attention_mask[rows],
                                             rollout.position_ids[rows], rollout.response_length)
                for rows in torch.arange(len(rollout), device=mask.device).split(self.micro_batch_size)
            ])
        head_params = list(model.value_head.parameters())
        local_minibatch = config.mini_batch_size // self.accelerator.num_processes
        losses = []
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(rollout), device=mask.device)
            for start in range(0, len(rollout), local_minibatch):
                rows = order[start:start + local_minibatch]
                normaliser = self._global_sum(self._agg_units(mask[rows]))
                if float(normaliser) == 0:
                    continue
                loss, _ = value_loss(model.value_head(hidden[rows]), batch.values[rows], batch.returns[rows], mask[rows],
                                     clip_range=config.value_clip_range, loss_agg_mode=config.loss_agg_mode,
                                     norm_length=config.max_new_tokens)
                share = self._agg_units(mask[rows]) / normaliser
                (loss * share).backward()
                for param in head_params:
                    param.grad = self._global_sum(param.grad)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(head_params, config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                losses.append(float(loss.detach() * share))  # summed over processes: the minibatch's loss
        return float(self._global_sum(sum(losses))) / len(losses) if losses else math.nan

    def _agg_units(self, mask: Tensor) -> Tensor:
        """What the loss averages over (rlhf.algorithms.agg_units): tokens, or kept sequences."""
        return agg_units(mask, self.config.loss_agg_mode)

    def _micro_step(self, batch: Experience, rows: Tensor, normaliser: Tensor) -> dict[str, float]:
        """Forward + backward of one micro-batch; steps the optimizer on the minibatch's last one.

        Each micro-batch's mean loss is rescaled by (its units / the minibatch's global units) x
        processes x accumulation steps, undoing DDP's and Accelerate's averaging, so the summed
        gradient is exactly the minibatch loss normalised by global counts (RL_NOTES 14).
        """
        config, accelerator = self.config, self.accelerator
        rollout, mask = batch.rollout, batch.loss_mask[rows]
        share = float(self._agg_units(mask) / normaliser)  # this micro-batch's part of the minibatch loss
        scale = share * accelerator.num_processes * config.gradient_accumulation_steps
        measure_here = batch.old_logprobs is None  # see old_logprobs_from_update
        with accelerator.accumulate(self.model):
            logprobs, values, entropy = forward_response(self.model, rollout, rows, config.temperature,
                                                         with_entropy=measure_here)
            old_logprobs = logprobs.detach() if measure_here else batch.old_logprobs[rows]
            pg_loss, stats = self.policy_loss(logprobs, old_logprobs, batch.advantages[rows], mask, **declared_kwargs(
                self.policy_loss, dict(clip_range=config.clip_range, clip_range_high=config.clip_range_high,
                                       dual_clip=config.dual_clip, loss_agg_mode=config.loss_agg_mode,
                                       norm_length=config.max_new_tokens)))
            loss = pg_loss
            # Loss metrics as shares: summed over micro-batches and processes they give the minibatch's loss.
            stats["policy_loss"] = float(pg_loss.detach()) * share
            if measure_here:  # sums for the metrics the skipped no-grad pass would have given (update() divides)
                real = rollout.mask[rows]
                stats["entropy_sum"] = float((entropy * real).sum())
                stats["response_tokens"] = float(real.sum())
                if batch.ref_logprobs is not None:
                    stats["kl_sum"] = float(kl_penalty(old_logprobs, batch.ref_logprobs[rows], config.kl_estimator,
                                                       real).sum())
                    stats["sequences"] = float(len(rows))
            if values is not None:
                vf_loss, vf_stats = value_loss(values, batch.values[rows], batch.returns[rows], mask,
                                               clip_range=config.value_clip_range, loss_agg_mode=config.loss_agg_mode,
                                               norm_length=config.max_new_tokens)
                loss = loss + config.vf_coef * vf_loss
                stats.update(vf_stats, value_loss=float(vf_loss.detach()) * share)
            if not config.kl_in_reward and batch.ref_logprobs is not None:
                kl_loss = agg_loss(kl_penalty(logprobs, batch.ref_logprobs[rows], config.kl_estimator), mask,
                                   config.loss_agg_mode, config.max_new_tokens)
                loss = loss + self.kl_controller.value * kl_loss
                stats["kl_loss"] = float(kl_loss.detach()) * share
            accelerator.backward(loss * scale)
            if accelerator.sync_gradients:
                # inf = measure without clipping; the norm of the synchronised gradient is the same
                # on every process, so all of them skip together.
                grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm or math.inf)
                if grad_norm is not None:  # DeepSpeed clips inside its own step and returns None
                    stats["grad_norm"] = float(grad_norm)
                    if not math.isfinite(stats["grad_norm"]):
                        self.optimizer.zero_grad()
                        self.consecutive_skips += 1
                        stats["skipped_steps"] = 1.0
                        return stats
                self.consecutive_skips = 0
                stats["skipped_steps"] = 0.0
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return stats

    # ------------------------------------------------------------------------------ logging, saving

    def _throughput(self, rollout: Rollout, step_time: float, rollout_time: float, update_time: float) -> dict[str, float]:
        sequences = self._global_sum(float(len(rollout)))
        tokens = self._global_sum(rollout.mask.sum())
        return {
            "response_length_mean": float(tokens / sequences),
            "eos_rate": self._global_mean(rollout.eos_found.float().mean()),
            "samples_per_second": float(sequences) / step_time,
            "tokens_per_second": float(tokens) / step_time,
            "step_time_s": step_time, "rollout_time_s": rollout_time, "update_time_s": update_time,
        }

    def _log(self, metrics: dict[str, float], rollout: Rollout, scores: Tensor) -> None:
        row = {key: metrics.get(key, math.nan) for key in METRIC_KEYS if key != "step"}
        row.update({k: v for k, v in metrics.items() if k not in row})
        self.accelerator.log(row, step=self.step)
        if self.accelerator.is_main_process and self.config.num_samples_to_log:
            with (self.output_dir / "samples.jsonl").open("a") as handle:
                for i in range(min(self.config.num_samples_to_log, len(rollout))):
                    handle.write(json.dumps({"step": self.step, "prompt": rollout.prompts[i],
                                             "completion": rollout.completions[i], "reward": float(scores[i])}) + "\n")

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consecutive_skips": self.consecutive_skips,
            "kl_controller": self.kl_controller.state_dict(),
            "baseline": self.baseline.state_dict(),
            "sampler": self.sampler.state_dict(),
            "python_rng": ckpt.encode_python_rng(random.getstate()),
            "compatibility": self._compatibility(),
        }

    def _compatibility(self) -> dict[str, Any]:
        c = self.config
        return {"model_name_or_path": c.model_name_or_path, "init_adapter": c.init_adapter, "lora_r": c.lora_r,
                "lora_alpha": c.lora_alpha, "lora_target_modules": c.lora_target_modules,
                "advantage_estimator": c.advantage_estimator, "policy_loss": c.policy_loss,
                "update_method": c.update_method, "value_head": c.needs_value_head}

    def _gathered_state(self) -> dict[str, Tensor] | None:
        """Full weights when ZeRO-3/FSDP shard them (every process must call this), else None."""
        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return self.accelerator.get_state_dict(self.model)
        return None

    def save_checkpoint(self) -> Path:
        unwrapped = self.unwrapped
        return ckpt.save_checkpoint(self.accelerator, unwrapped.policy, unwrapped.value_head, self.trainer_state(),
                                    self.output_dir / "checkpoints", self.step, self.config.save_total_limit,
                                    full_state=self._gathered_state(), init_adapter=self.init_adapter)

    def _resume(self, path: Path) -> None:
        unwrapped = self.unwrapped
        state = ckpt.load_checkpoint(self.accelerator, unwrapped.policy, unwrapped.value_head, path, self._compatibility())
        self.step = int(state["step"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.baseline.load_state_dict(state["baseline"])
        self.sampler.load_state_dict(state["sampler"])
        random.setstate(ckpt.decode_python_rng(state["python_rng"]))
        if self.accelerator.is_main_process:
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_metrics(self.output_dir / name, self.step)
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    def save_final(self) -> Path:
        full_state = self._gathered_state()
        unwrapped = self.unwrapped

        def write_adapter_and_tokenizer(staging: Path) -> None:
            ckpt.save_adapter_and_head(unwrapped.policy, unwrapped.value_head, staging, full_state, self.init_adapter)
            self.tokenizer.save_pretrained(staging)

        final = ckpt.write_atomically(self.accelerator, self.output_dir / "final", write_adapter_and_tokenizer)
        self.accelerator.wait_for_everyone()
        return final


def _flat_config(config: RLConfig) -> dict[str, Any]:
    # TensorBoard's hparams accept only scalars and strings.
    def scalar(value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(map(str, value))
        if isinstance(value, dict):
            return json.dumps(value)
        return "none" if value is None else value

    return {key: scalar(value) for key, value in config.to_dict().items()}
