"""Update methods: an Experience -> new weights and metrics.

    UPDATERS["optimizer"]   ppo_epochs x shuffled minibatches, one AdamW step each; micro-batches
                            with globally normalised loss shares; non-finite guard
    UPDATERS["trpo"]        one natural-gradient step in a KL trust region (rlhf.algorithms.trpo);
                            AdamW fits only the value head

An updater is built once with what it declares (model, optimizer, scheduler, accelerator, config,
policy_loss, reducer, micro_batch_size) and called as ``updater(batch, kl_coef) -> metrics``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhf.algorithms import Algorithm, Registry, agg_loss, agg_units, kl_penalty, trpo_step, value_loss
from rlhf.distributed import Reducer
from rlhf.experience import Experience
from rlhf.rollout import forward_response

UPDATERS: Registry = Registry("update method")

# Per-micro-batch sums that update() turns into global means (the skipped no-grad pass's metrics).
_TOTALS = ("entropy_sum", "response_tokens", "kl_sum", "sequences")
# Loss metrics logged as shares: summed over micro-batches and processes they give the minibatch's loss.
_SHARES = ("policy_loss", "value_loss", "kl_loss")


def uses_deepspeed(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


class FiniteStepGuard:
    """Takes back an optimizer step that leaves a weight non-finite although the gradient was
    finite (a huge learning rate, overflowing Adam moments): weights and optimizer state return to
    what they were before it, as for a skipped step. The trained tensors (LoRA, value head) are
    small, so copying them before each step costs little next to the step. DeepSpeed keeps its
    own master weights and overflow handling, so it is left alone there."""

    def __init__(self, optimizer: Any, reducer: Reducer, enabled: bool = True):
        self.optimizer, self.reducer, self.enabled = optimizer, reducer, enabled
        self.inner = getattr(optimizer, "optimizer", optimizer)  # torch's, inside Accelerate's wrapper

    def step(self) -> bool:
        """Step the optimizer; False (and nothing changed) when a weight came out non-finite."""
        if not self.enabled:
            self.optimizer.step()
            return True
        params = [p for group in self.inner.param_groups for p in group["params"]]
        weights = [p.detach().clone() for p in params]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in self.inner.state[p].items()}
                 for p in params if p in self.inner.state}
        self.optimizer.step()
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
        if self.reducer.max(0.0 if finite else 1.0) == 0:  # the same answer on every process (sharded weights)
            return True
        with torch.no_grad():
            for param, weight in zip(params, weights):
                param.copy_(weight)
        for param in params:
            if param in state:
                self.inner.state[param] = state[param]
            else:
                self.inner.state.pop(param, None)
        return False


@UPDATERS.register("optimizer")
class GradientUpdate:
    """ppo_epochs passes of shuffled minibatches; one optimizer step per minibatch."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, config: Any,
                 policy_loss: Algorithm, reducer: Reducer, micro_batch_size: int):
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.config, self.policy_loss, self.reducer, self.micro_batch_size = config, policy_loss, reducer, micro_batch_size
        self.consecutive_skips = 0  # optimizer steps in a row skipped for a non-finite loss/gradient
        self.step_guard = FiniteStepGuard(optimizer, reducer, enabled=not uses_deepspeed(accelerator))

    def __call__(self, batch: Experience, kl_coef: float) -> dict[str, float]:
        config, rollout = self.config, batch.rollout
        local_minibatch = config.mini_batch_size // self.accelerator.num_processes
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # grad_norm exists only on the micro-batch that steps
        minibatches = 0
        self.model.train()
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(rollout), device=rollout.mask.device)
            for start in range(0, len(rollout), local_minibatch):
                minibatch = order[start:start + local_minibatch]
                normaliser = self.reducer.sum(agg_units(batch.loss_mask[minibatch], config.aggregation))
                if float(normaliser) == 0:  # every row dropped by filter_zero_std_groups, on all processes
                    continue
                minibatches += 1
                if len(minibatch) > self.micro_batch_size:  # similar lengths share a micro-batch: less padding
                    minibatch = minibatch[rollout.mask[minibatch].sum(-1).argsort(stable=True)]
                for micro_start in range(0, len(minibatch), self.micro_batch_size):
                    rows = minibatch[micro_start:micro_start + self.micro_batch_size]
                    for key, value in self.micro_step(batch, rows, normaliser, kl_coef).items():
                        sums[key] = sums.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
        self.model.eval()
        metrics = self._global_metrics(sums, counts, minibatches)
        if minibatches == 0:
            metrics["empty_updates"] = 1.0
        return metrics

    def _global_metrics(self, sums: dict[str, float], counts: dict[str, int], minibatches: int) -> dict[str, float]:
        reducer = self.reducer
        skipped = sums.pop("skipped_steps", 0.0)  # a count (the same on every process), not a mean
        # Token and sequence means over every process (micro-batches hold different token counts).
        totals = {key: sums.pop(key) for key in _TOTALS if key in sums}
        shares = {key: sums.pop(key) for key in _SHARES if key in sums}
        means = {key: reducer.mean(value / counts[key]) for key, value in sums.items()}
        if shares:  # the mean over minibatches of each minibatch's global loss
            means.update(zip(shares, (reducer.sum(list(shares.values())) / max(minibatches, 1)).tolist()))
        means["skipped_steps"] = skipped
        if totals:
            global_totals = dict(zip(totals, reducer.sum(list(totals.values())).tolist()))
            means["entropy"] = global_totals["entropy_sum"] / max(global_totals["response_tokens"], 1.0)
            if "kl_sum" in global_totals:
                means["kl"] = global_totals["kl_sum"] / max(global_totals["sequences"], 1.0)
        means.setdefault("value_loss", math.nan)
        means["learning_rate"] = self.scheduler.get_last_lr()[0]
        return means

    def micro_step(self, batch: Experience, rows: Tensor, normaliser: Tensor, kl_coef: float) -> dict[str, float]:
        """Forward + backward of one micro-batch; steps the optimizer on the minibatch's last one.

        Each micro-batch's mean loss is rescaled by (its units / the minibatch's global units) x
        processes x accumulation steps, undoing DDP's and Accelerate's averaging, so the summed
        gradient is exactly the minibatch loss normalised by global counts (RL_NOTES 14).
        """
        config, accelerator = self.config, self.accelerator
        # Only the columns some row of this micro-batch uses; every [B, T] input is cut to them
        # (all losses read masked tokens only, and their length normalisers are max_new_tokens).
        rollout, width = batch.rollout.narrowed(rows)
        cut = (rows, slice(None, width))
        mask, mode = batch.loss_mask[cut], config.aggregation
        share = float(agg_units(mask, mode) / normaliser)  # this micro-batch's part of the minibatch loss
        scale = share * accelerator.num_processes * config.gradient_accumulation_steps
        measure_here = batch.old_logprobs is None  # see rlhf.experience.plan_passes
        with accelerator.accumulate(self.model):
            logprobs, values, entropy = forward_response(self.model, rollout, slice(None), config.temperature,
                                                         with_entropy=measure_here)
            old_logprobs = logprobs.detach() if measure_here else batch.old_logprobs[cut]
            loss, stats = self.policy_loss(logprobs, old_logprobs, batch.advantages[cut], mask, **config.policy_loss_settings())
            stats["policy_loss"] = float(loss.detach()) * share
            if measure_here:  # sums for the metrics the skipped no-grad pass would have given
                real = rollout.mask
                stats["entropy_sum"] = float((entropy * real).sum())
                stats["response_tokens"] = float(real.sum())
                if batch.ref_logprobs is not None:
                    stats["kl_sum"] = float(kl_penalty(old_logprobs, batch.ref_logprobs[cut], config.kl_estimator,
                                                       real).sum())
                    stats["sequences"] = float(len(rows))
            if values is not None:
                vf_loss, vf_stats = value_loss(values, batch.values[cut], batch.returns[cut], mask,
                                               clip_range=config.value_clip_range, loss_agg_mode=mode,
                                               norm_length=config.max_new_tokens)
                loss = loss + config.vf_coef * vf_loss
                stats.update(vf_stats, value_loss=float(vf_loss.detach()) * share)
            if not config.kl_in_reward and batch.ref_logprobs is not None:
                kl_loss = agg_loss(kl_penalty(logprobs, batch.ref_logprobs[cut], config.kl_estimator), mask,
                                   mode, config.max_new_tokens)
                loss = loss + kl_coef * kl_loss
                stats["kl_loss"] = float(kl_loss.detach()) * share
            accelerator.backward(loss * scale)
            if accelerator.sync_gradients and not self._gradient_is_finite(stats):
                return stats
            if not accelerator.sync_gradients:
                self.optimizer.step()  # accumulating: Accelerate's wrapper skips it
            elif self.step_guard.step():
                self.consecutive_skips = 0
                self.scheduler.step()
            else:  # the step made a weight non-finite and was taken back
                self._count_skip(stats)
                return stats
            self.optimizer.zero_grad()
        return stats

    def _count_skip(self, stats: dict[str, float]) -> None:
        self.optimizer.zero_grad()
        self.consecutive_skips += 1
        stats["skipped_steps"] = 1.0

    def _gradient_is_finite(self, stats: dict[str, float]) -> bool:
        """Clip and measure the synchronised gradient; a non-finite one is dropped and counted.

        inf = measure without clipping; the norm is the same on every process, so all skip together."""
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm or math.inf)
        if grad_norm is not None:  # DeepSpeed clips inside its own step and returns None
            stats["grad_norm"] = float(grad_norm)
            if not math.isfinite(stats["grad_norm"]):
                self._count_skip(stats)
                return False
        stats["skipped_steps"] = 0.0
        return True


@UPDATERS.register("trpo", old_logprobs=True, policy_optimizer=False, unsharded_weights=True)
class TRPOUpdate:
    """One natural-gradient step of the LoRA weights in the KL trust region, then the value head
    (if any) fitted by AdamW on frozen features for ppo_epochs passes."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, config: Any,
                 reducer: Reducer, micro_batch_size: int):
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.config, self.reducer, self.micro_batch_size = config, reducer, micro_batch_size
        self.consecutive_skips = 0  # the line search never applies a non-finite step

    def __call__(self, batch: Experience, kl_coef: float) -> dict[str, float]:
        config, model, rollout = self.config, self.accelerator.unwrap_model(self.model), batch.rollout
        lora_params = [p for p in model.policy.parameters() if p.requires_grad]

        def policy_logprobs_full(rows: Tensor) -> Tensor:
            logits, _, _ = model(input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows],
                              position_ids=rollout.position_ids[rows], response_length=rollout.response_length)
            return torch.log_softmax(logits.float() / config.temperature, dim=-1)

        micro_batches = list(torch.arange(len(rollout), device=rollout.mask.device).split(self.micro_batch_size))
        stats = trpo_step(
            lora_params, policy_logprobs_full, micro_batches, rollout.response_ids, batch.old_logprobs,
            batch.advantages, batch.loss_mask, max_kl=config.max_kl, cg_iters=config.cg_iters,
            cg_damping=config.cg_damping, line_search_backtracks=config.line_search_backtracks,
            line_search_accept_ratio=config.line_search_accept_ratio, loss_agg_mode=config.aggregation,
            norm_length=config.max_new_tokens, ref_logprobs=None if config.kl_in_reward else batch.ref_logprobs,
            kl_coef=kl_coef, kl_estimator=config.kl_estimator,
            fisher_rows=self.fisher_rows(len(rollout), rollout.mask.device),
            all_reduce=lambda t: self.reducer.sum(t).to(t.dtype),
        )
        stats["approx_kl"] = stats["trpo/kl_after_step"]
        stats["value_loss"] = self.fit_value_head(batch) if model.value_head is not None else math.nan
        stats["learning_rate"] = self.scheduler.get_last_lr()[0] if self.scheduler is not None else math.nan
        return stats

    def fisher_rows(self, local_rows: int, device: torch.device) -> Tensor:
        """This process's rows of the evenly spaced fisher_sample_fraction of the global rollout.

        Chosen on the global row numbers, so the Fisher estimate (and the step) does not depend on
        how the batch is split over processes."""
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        global_rows = local_rows * processes
        count = max(1, round(self.config.fisher_sample_fraction * global_rows))
        chosen = torch.linspace(0, global_rows - 1, count, device=device).round().long().unique()
        mine = chosen[(chosen >= rank * local_rows) & (chosen < (rank + 1) * local_rows)]
        return mine - rank * local_rows

    def fit_value_head(self, batch: Experience) -> float:
        """Regress the value head on the returns with its own optimizer. The backbone is frozen
        here, so its features are computed once and the head's gradients are summed over
        processes by hand (there is no DDP backward)."""
        config, rollout, mask = self.config, batch.rollout, batch.loss_mask
        model, reducer, mode = self.accelerator.unwrap_model(self.model), self.reducer, config.aggregation
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
                normaliser = reducer.sum(agg_units(mask[rows], mode))
                if float(normaliser) == 0:
                    continue
                loss, _ = value_loss(model.value_head(hidden[rows]), batch.values[rows], batch.returns[rows], mask[rows],
                                     clip_range=config.value_clip_range, loss_agg_mode=mode,
                                     norm_length=config.max_new_tokens)
                share = agg_units(mask[rows], mode) / normaliser
                (loss * share).backward()
                for param in head_params:
                    param.grad = reducer.sum(param.grad)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(head_params, config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                losses.append(float(loss.detach() * share))  # summed over processes: the minibatch's loss
        return float(reducer.sum(sum(losses))) / len(losses) if losses else math.nan
