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
from typing import Any, Callable

import torch
from torch import Tensor

from rlhf.algorithms import Algorithm, Registry, agg_loss, agg_units, kl_penalty, trpo_step, value_loss
from rlhf.algorithms.losses import AdaptiveEntropyController, high_entropy_mask, log_importance_weights, off_policy_mask
from rlhf.cpu_linear import expect_micro_batch
from rlhf.distributed import Reducer
from rlhf.errors import ConfigError
from rlhf.experience import Experience, sampler_mismatch_metrics, sampler_mismatch_totals
from rlhf.models import update_mode
from rlhf.rollout import Rollout, forward_response

UPDATERS: Registry = Registry("update method")

# Per-micro-batch sums that update() turns into global means (the skipped no-grad pass's metrics).
_TOTALS = ("entropy_sum", "response_tokens", "kl_sum", "sequences")
# The sampler-vs-trainer mismatch measured on the update's forward (rlhf.experience.sampler_mismatch_totals).
_SAMPLER_TOTALS = ("sampler_kl_sum", "sampler_abs_diff_sum", "sampler_tokens", "sampler_abs_diff_max")
_MAXIMA = ("sampler_abs_diff_max",)  # kept as the largest over micro-batches, not summed
# Loss metrics logged as shares: summed over micro-batches and processes they give the minibatch's loss.
_SHARES = ("policy_loss", "value_loss", "kl_loss")


def uses_deepspeed(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def loss_terms(policy_loss: Algorithm, config: Any, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
               mask: Tensor, *, entropy: Tensor | None = None, ref_logprobs: Tensor | None = None,
               sampler_logprobs: Tensor | None = None, is_weights: Tensor | None = None,
               gather: Callable[[Tensor], Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """One micro-batch's loss terms, each normalised as if it were the whole batch, and the loss's stats.

    logprobs (with gradient), old_logprobs, advantages, mask, entropy, ref_logprobs,
    sampler_logprobs, is_weights: [B, T]. Returns float32 scalars
        policy         the registered loss with token_weights = off-policy mask x high-entropy mask x
                       is_weights (a loss that declares is_weights, vespo, takes those itself)
        kl             (ref_logprobs given) agg_loss of the per-token KL, x the importance ratio with
                       use_bias_correction_kl; unmasked by the token weights
        entropy        (entropy given) mean entropy over the trained tokens (mask x high-entropy mask),
        entropy_sum, entropy_tokens   its numerator and denominator (the adaptive controller's window)
    With one micro-batch, policy + kl_coef x kl - entropy_coef x entropy is TRL 1.16
    GRPOTrainer._compute_loss (tests/test_trl_loss_equivalence.py); the update scales each term by
    its micro-batch share.
    """
    weights: Tensor | None = None
    if config.off_policy_mask_threshold is not None:
        # TRL: the sampler's logprobs where it corrects for a separate sampler (vLLM), else the
        # rollout policy's; with top_p < 1 the two differ by log(kept mass) on every token.
        separate_sampler = sampler_logprobs is not None and config.importance_sampling_correction != "none"
        reference = sampler_logprobs if separate_sampler else old_logprobs
        weights = off_policy_mask(advantages, logprobs, reference, mask, config.off_policy_mask_threshold)
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy, mask, config.top_entropy_quantile, gather)
        weights = entropy_mask.float() if weights is None else weights * entropy_mask
    inputs: dict[str, Tensor] = {}
    if is_weights is not None:
        if "is_weights" in policy_loss.fn_defaults:
            inputs["is_weights"] = is_weights
        else:
            weights = is_weights.float() if weights is None else weights * is_weights
    if weights is not None:
        if "token_weights" not in policy_loss.fn_defaults:
            raise ConfigError(f"policy_loss {policy_loss.name} takes no token_weights, so it cannot apply importance-"
                              "sampling weights or token masks; choose a loss that declares token_weights")
        inputs["token_weights"] = weights
    settings = config.policy_loss_settings()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, **inputs, **settings)
    terms = {"policy": loss}
    if ref_logprobs is not None:
        per_token_kl = kl_penalty(logprobs, ref_logprobs, config.kl_estimator)
        if config.use_bias_correction_kl:  # x the differentiable importance ratio (DeepSeek-V3.2)
            level = settings.get("importance_sampling_level",
                                 policy_loss.fn_defaults.get("importance_sampling_level", "token"))
            per_token_kl = per_token_kl * torch.exp(log_importance_weights(logprobs, old_logprobs, mask, level)
                                                    .clamp(-20.0, 20.0))
        terms["kl"] = agg_loss(per_token_kl, mask, config.aggregation, config.max_new_tokens)
    if entropy is not None:
        effective = mask.float() if entropy_mask is None else mask.float() * entropy_mask.float()
        terms["entropy_sum"], terms["entropy_tokens"] = (entropy * effective).sum(), effective.sum()
        terms["entropy"] = terms["entropy_sum"] / terms["entropy_tokens"].clamp(min=1.0)
    return terms, stats


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite.

    A sum is finite wherever its terms are (a NaN or an infinity anywhere makes it NaN or
    infinite), so one sum per tensor answers for the usual case; only where a sum is not finite
    (a non-finite element, or finite ones that overflow together) are the elements checked one
    by one. SmolLM2-135M's 420 LoRA tensors on the 2-core EPYC: 13 ms per optimizer step with
    ``isfinite`` per tensor, 1.6 ms this way."""
    with torch.no_grad():
        # complex tensors skip the sum: a real one would drop the imaginary parts
        if (tensors and not any(tensor.is_complex() for tensor in tensors)
                and bool(torch.stack([tensor.sum().float() for tensor in tensors]).isfinite().all())):
            return True
        return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


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
        finite = all_finite(params)
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
        # TRL's entropy bonus: its coefficient (adaptive or not) is checkpointed by the trainer
        self.entropy_control = AdaptiveEntropyController(
            config.entropy_coef, config.use_adaptive_entropy, config.entropy_target, config.entropy_coef_min,
            config.entropy_coef_max, config.entropy_coef_delta)
        self._entropy_window: Tensor | None = None  # [entropy sum, tokens] of the optimizer step's micro-batches
        self._largest_positions: int | None = None  # rows x columns of the update's largest micro-batch, at most

    def __call__(self, batch: Experience, kl_coef: float) -> dict[str, float]:
        config, rollout = self.config, batch.rollout
        local_minibatch = config.mini_batch_size // self.accelerator.num_processes
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # grad_norm exists only on the micro-batch that steps
        minibatches = 0
        # no micro-batch runs more rows than this, nor more columns than the rollout's used ones
        most_rows = min(self.micro_batch_size, local_minibatch, len(rollout))
        every_row = torch.arange(len(rollout), device=rollout.mask.device)
        self._largest_positions = most_rows * rollout.narrowed(every_row)[0].input_ids.shape[1] if most_rows else 0
        update_mode(self.model)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(rollout), device=rollout.mask.device)
            for start in range(0, len(rollout), local_minibatch):
                minibatch = order[start:start + local_minibatch]
                if len(minibatch) > self.micro_batch_size:  # similar lengths share a micro-batch: less padding
                    minibatch = minibatch[rollout.span[minibatch].sum(-1).argsort(stable=True)]
                micro_batches = list(minibatch.split(self.micro_batch_size))
                # Units summed per micro-batch (the same as over the minibatch for every mode but
                # micro-batch-token-mean, whose unit is the micro-batch), and micro-batches in all.
                units = sum(agg_units(batch.loss_mask[rows], config.aggregation) for rows in micro_batches)
                totals = self.reducer.sum(torch.stack([units, units.new_tensor(float(len(micro_batches)))]))
                normaliser, micro_total = totals[0], float(totals[1])
                if float(normaliser) == 0:  # every row dropped by filter_zero_std_groups, on all processes
                    continue
                minibatches += 1
                for rows in micro_batches:
                    for key, value in self.micro_step(batch, rows, normaliser, kl_coef, micro_total).items():
                        sums[key] = max(sums.get(key, 0.0), value) if key in _MAXIMA else sums.get(key, 0.0) + value
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
        mismatch = {key: sums.pop(key) for key in _SAMPLER_TOTALS if key in sums}
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
        if mismatch:  # the update's forward stood in for the old-logprob pass
            means.update(sampler_mismatch_metrics(mismatch, reducer))
        means.setdefault("value_loss", math.nan)
        means["learning_rate"] = self.scheduler.get_last_lr()[0]
        return means

    def micro_step(self, batch: Experience, rows: Tensor, normaliser: Tensor, kl_coef: float,
                   micro_total: float = 1.0) -> dict[str, float]:
        """Forward + backward of one micro-batch; steps the optimizer on the minibatch's last one.

        Each micro-batch's mean loss is rescaled by (its units / the minibatch's global units) x
        processes x accumulation steps, undoing DDP's and Accelerate's averaging, so the summed
        gradient is exactly the minibatch loss normalised by global counts (RL_NOTES 14). The
        entropy bonus is each micro-batch's token mean over ``micro_total`` (all processes'
        micro-batches), as TRL adds it whatever the loss type.
        """
        config, accelerator = self.config, self.accelerator
        # Only the columns some row of this micro-batch uses; every [B, T] input is cut to them
        # (all losses read masked tokens only, and their length normalisers are max_new_tokens).
        rollout, width = batch.rollout.narrowed(rows)
        # kept weight copies must leave room for a longer micro-batch's activations later
        positions = rollout.input_ids.numel()
        expect_micro_batch(positions, max(self._largest_positions or 0, positions))
        cut = (rows, slice(None, width))
        mask, mode = batch.loss_mask[cut], config.aggregation
        share = float(agg_units(mask, mode) / normaliser)  # this micro-batch's part of the minibatch loss
        replicas = accelerator.num_processes * config.gradient_accumulation_steps  # DDP and Accelerate average over them
        scale = share * replicas
        measure_here = batch.old_logprobs is None  # see rlhf.experience.plan_passes
        bonus = self.entropy_control.enabled
        with accelerator.accumulate(self.model):
            if bonus:  # the bonus needs the entropy's gradient
                logprobs, values, entropy = self._forward_with_entropy_gradient(rollout)
            else:
                logprobs, values, entropy = forward_response(
                    self.model, rollout, slice(None), config.temperature,
                    with_entropy=measure_here or config.top_entropy_quantile < 1.0)
            old_logprobs = logprobs.detach() if measure_here else batch.old_logprobs[cut]
            sampler_logprobs, is_weights = getattr(batch, "sampler_logprobs", None), getattr(batch, "is_weights", None)
            terms, stats = loss_terms(
                self.policy_loss, config, logprobs, old_logprobs, batch.advantages[cut], mask, entropy=entropy,
                ref_logprobs=None if config.kl_in_reward or batch.ref_logprobs is None else batch.ref_logprobs[cut],
                sampler_logprobs=None if sampler_logprobs is None else sampler_logprobs[cut],
                is_weights=None if is_weights is None else is_weights[cut],
                gather=self._gather_padded if accelerator.num_processes > 1 else None)
            loss = terms["policy"]
            stats["policy_loss"] = float(loss.detach()) * share
            if measure_here:  # sums for the metrics the skipped no-grad pass would have given
                real = rollout.mask
                stats["entropy_sum"] = float((entropy.detach() * real).sum())
                stats["response_tokens"] = float(real.sum())
                if rollout.sampler_logprobs is not None:
                    stats.update(sampler_mismatch_totals(old_logprobs, rollout.sampler_logprobs, real))
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
            if "kl" in terms:
                loss = loss + kl_coef * terms["kl"]
                stats["kl_loss"] = float(terms["kl"].detach()) * share
            loss = loss * scale  # the micro-batch's share of the minibatch loss, DDP/accumulation undone
            if bonus:  # a token mean per micro-batch, not a share of the loss's normaliser (TRL)
                window = torch.stack([terms["entropy_sum"].detach(), terms["entropy_tokens"]])
                self._entropy_window = window if self._entropy_window is None else self._entropy_window + window
                stats["entropy_bonus_coef"] = coef = self.entropy_control.applied()
                loss = loss - coef * terms["entropy"] / micro_total * replicas
            accelerator.backward(loss)
            if bonus and accelerator.sync_gradients:  # the optimizer-step boundary: adapt the coefficient
                self._close_entropy_window(stats)
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

    def _forward_with_entropy_gradient(self, rollout: Rollout) -> tuple[Tensor, Tensor | None, Tensor]:
        """logprobs [b, T], values [b, T] | None, entropy [b, T] with its gradient (logits / temperature;
        through the chunked LM head where the model takes it, so the [b, T, V] logits never exist)."""
        return self.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                          position_ids=rollout.position_ids, response_length=rollout.response_length,
                          labels=rollout.response_ids, temperature=self.config.temperature, with_entropy=True,
                          entropy_gradient=True, sampled=rollout.sampled(slice(None)))

    def _gather_padded(self, values: Tensor) -> Tensor:
        """1-D tensors of every process, concatenated (they differ in length)."""
        sentinel = -1e9  # entropies are >= 0
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(values, dim=0, pad_index=sentinel))
        return gathered[gathered != sentinel]

    def _close_entropy_window(self, stats: dict[str, float]) -> None:
        """The step's entropy over every process's micro-batches -> the adaptive coefficient."""
        if self._entropy_window is not None:
            total, count = self.reducer.sum(self._entropy_window).tolist()
            self.entropy_control.update(total / max(count, 1.0))
            self._entropy_window = None
        stats["entropy_coef"] = self.entropy_control.value

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
