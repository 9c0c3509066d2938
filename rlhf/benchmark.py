"""Throughput side by side: this project's GRPO/PPO/REINFORCE against TRL's GRPOTrainer on the
same work (model, LoRA, prompts, group size, batch, response length, sampling, learning rate and
reward), one system per child process so each peak RSS is its own; warm-up steps are excluded.

``--lengths``: the same at each response length, in one table and a plot (rlhf.benchmark_report);
responses run to full length in every system unless ``--full_length false``. ``--roofline``: each
phase of our GRPO step against this machine's limits (rlhf.roofline). ``--grow``: our GRPO's step
time and peak RSS against response length, group size and model size. ``--floor``: bare
``generate``, one no-grad forward and one forward+backward on one batch of the same shape -- what a
step cannot go below -- and our GRPO step as a multiple of it. ``--learning``: what each GRPO
learns in the same wall time (rlhf.learning_race).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import queue as queues
import resource
import shutil
import signal
import stat
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError
from rlhf.signals import stop_process

SYSTEMS = ("ours-grpo", "ours-ppo", "ours-reinforce", "trl-grpo")
PHASES = ("generation", "scoring", "logprobs", "update")


@dataclass
class BenchmarkConfig:
    steps: int = field(default=3, metadata={"help": "Measured steps per system (after the warm-up)."})
    warmup_steps: int = field(default=1, metadata={"help": "Steps run first and not measured."})
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "Policy model for every system: a name, a dir, or random:smollm2-135m / random:smollm2-360m / "
                "random:smollm2-1.7b (that shape, random weights, the embedded tokenizer: timing only)."})
    prompts_per_step: int = field(default=4, metadata={"help": "Prompts per step (PPO/REINFORCE: x num_generations)."})
    num_generations: int = field(default=4, metadata={"help": "Samples per prompt (the GRPO group)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Response length cap (without --lengths)."})
    lengths: list[int] | None = field(default=None, metadata={
        "help": "Response lengths (max_new_tokens) to run every system at, e.g. 32 128 256: one table with the "
                "ratios per length, a PNG of seconds per step against length next to --out. Default: max_new_tokens."})
    full_length: bool = field(default=True, metadata={
        "help": "Every response runs to max_new_tokens in every system, so a length means that many tokens: "
                "ours with no stop token, TRL with min_new_tokens (EOS held back). false: responses end at EOS."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Same for every system."})
    bf16: bool = field(default=False, metadata={
        "help": "Every system in bfloat16: the model's weights loaded in bfloat16 (ours: --bf16; TRL: the model "
                "loaded so and GRPOConfig bf16=True). Default float32."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2r, all linear layers)."})
    seed: int = field(default=0, metadata={"help": "Seed of every system."})
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS),
                               metadata={"help": f"Any of {', '.join(SYSTEMS)}."})
    floor: bool = field(default=False, metadata={"help": "Also time generate / forward / forward+backward alone."})
    roofline: bool = field(default=False, metadata={
        "help": "Also measure this machine's memory bandwidth and fp32 GEMM rates at the step's shapes and show "
                "each phase of ours-grpo as a fraction of its least possible time (see README)."})
    grow: bool = field(default=False, metadata={
        "help": "Instead of comparing systems: our GRPO's step time and peak RSS against response length "
                "(--lengths), group size (--grow_generations) and model size (--grow_models), one at a time "
                "from the other settings; a table and a PNG next to --out."})
    grow_generations: list[int] = field(default_factory=lambda: [2, 4, 8], metadata={
        "help": "Group sizes (num_generations) of --grow."})
    grow_models: list[str] = field(default_factory=lambda: ["random:smollm2-135m", "random:smollm2-360m"], metadata={
        "help": "Models of --grow's size axis (random:smollm2-1.7b takes minutes per step on 2 CPU cores)."})
    profile: bool = field(default=False, metadata={"help": "Also run ours-grpo once more under torch.profiler (its own "
                                                           "process, not in the table); the op table of the first step "
                                                           "after warm-up, phases labelled, goes next to --out."})
    learning: bool = field(default=False, metadata={
        "help": "Instead of throughput: train ours-grpo and trl-grpo for --seconds each on the same work (responses "
                "end at EOS), then evaluate both adapters and the base on the held-out prompts (rlhf.learning_race)."})
    seconds: float = field(default=600.0, metadata={
        "help": "--learning: wall time each system trains, from the start of training (after the model loads); "
                "each stops at the first step boundary after it."})
    eval_num_prompts: int | None = field(default=None, metadata={
        "help": "--learning: evaluate on the first N prompts of builtin:prompts' eval split (default: all 40)."})
    eval_num_samples: int = field(default=4, metadata={"help": "--learning: responses per evaluation prompt."})
    out: str = field(default="bench.json", metadata={"help": "Where the JSON results go (the table .md and the plot "
                                                             ".png beside it)."})

    def __post_init__(self) -> None:
        from rlhf.config import check_learning_rate, check_seed
        from rlhf.random_models import check_spec

        for name in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        # as our trainer checks them, here rather than in each system's process after loading the model
        # (until 2026-12-07 --learning_rate 20 ran TRL alone and replaced an earlier report with that)
        check_learning_rate(self.learning_rate)
        check_seed(self.seed)
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 1):
            raise ConfigError(f"lengths must be response lengths >= 1, got {' '.join(map(str, self.lengths))}")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ConfigError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
        if (self.grow or self.learning) and self.systems != list(SYSTEMS):  # rather than ignore them
            raise ConfigError("--grow times our GRPO and --learning races ours against TRL's GRPO, their own "
                              "systems: drop --systems (it picks the systems of the throughput comparison)")
        if not self.systems:
            raise ConfigError(f"systems must name at least one system; choose from {', '.join(SYSTEMS)}")
        self.systems = list(dict.fromkeys(self.systems))  # each runs once, as each length does
        grouped = self.grow or self.learning or self.profile or any(s.endswith("-grpo") for s in self.systems)
        if grouped and self.num_generations < 2:
            raise ConfigError("GRPO compares the samples of one prompt: set num_generations >= 2, "
                              f"got {self.num_generations}")
        if self.grow and (not self.grow_generations or min(self.grow_generations) < 2):
            raise ConfigError("grow_generations must be group sizes >= 2, "
                              f"got {' '.join(map(str, self.grow_generations))}")
        if self.roofline and self.bf16:
            raise ConfigError("roofline measures float32 GEMM rates and counts float32 bytes: drop --bf16 or --roofline")
        if self.roofline and not self.full_length:
            raise ConfigError("roofline counts every row decoded to the full length: drop --full_length false or "
                              "--roofline (rows that end early would do less work than the bound counts)")
        if self.roofline and "ours-grpo" not in self.systems:
            raise ConfigError("roofline measures ours-grpo's phases: add ours-grpo to --systems")
        alone = [name for name in ("floor", "profile", "roofline") if getattr(self, name)]
        if self.grow and alone:
            raise ConfigError(f"grow times our GRPO alone: drop {', '.join('--' + n for n in alone)} "
                              "(they go with the systems comparison)")
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ConfigError(f"seconds must be > 0 (the wall time each system trains), got {self.seconds:g}")
        if self.eval_num_samples < 1 or (self.eval_num_prompts is not None and self.eval_num_prompts < 1):
            raise ConfigError(f"eval_num_prompts and eval_num_samples must be >= 1, got {self.eval_num_prompts} "
                              f"and {self.eval_num_samples}")
        besides = [f"--{n}" for n in ("grow", "floor", "profile", "roofline", "lengths") if getattr(self, n)]
        if self.learning and besides:
            raise ConfigError(f"learning races ours-grpo and trl-grpo for --seconds each: drop {', '.join(besides)} "
                              "(they go with the throughput comparison)")
        if self.grow and not self.grow_models:
            raise ConfigError("grow_models must name at least one model")
        for spec in [self.model, *(self.grow_models if self.grow else [])]:
            check_spec(spec)

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def sweep_lengths(self) -> list[int]:
        """The response lengths this run measures, shortest first, each once (derived: --lengths,
        else max_new_tokens)."""
        return sorted(set(self.lengths or [self.max_new_tokens]))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _gpu_facts() -> dict[str, Any]:
    """The GPU this process trained on and the most memory PyTorch's CUDA allocator handed out
    at once (MB); {} where it used none (peak RSS counts host memory only)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"gpu": torch.cuda.get_device_name(), "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20}


def _summarise(rows: list[dict[str, float]], sequences: int) -> dict[str, Any]:
    step = statistics.median(r["step"] for r in rows)
    return {
        "steps_measured": len(rows),
        "step_time_s": step,
        "samples_per_second": sequences / step,
        # the same median step as samples/s: a median of per-step rates averages two rates over an
        # even number of steps, so tokens/s was not samples/s x the length at full length
        "tokens_per_second": statistics.median(r["tokens"] for r in rows) / step,
        **{f"{phase}_s": statistics.median(r[phase] for r in rows) for phase in PHASES},
        # the batch's shape as our trainer ran it (for the roofline): padded prompt and response columns
        **{key: statistics.median(r[key] for r in rows)
           for key in ("prompt_length", "response_length") if key in rows[0]},
    }


def run_ours(algorithm: str, config: BenchmarkConfig, output_dir: Path,
             profile_to: Path | None = None) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Measured rows per step after the warm-up, and what the roofline needs to know of the run
    (separate no-grad passes per step, whether a group's prompt runs once, whether the update took
    the sampler's products)."""
    from rlhf.trainer import RLTrainer

    trainer = RLTrainer(ours_config(algorithm, config, output_dir, config.warmup_steps + config.steps))
    if config.full_length:
        trainer.stop_ids = []  # no token ends a response: every row samples max_new_tokens
    shapes = _record_rollout_shapes(trainer)
    if profile_to is not None:
        _profile_one_step(trainer, config.warmup_steps, profile_to)
    trainer.train()
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    # every measured step's update took its forward's products from the sampler (rlhf.sampled_products)
    sampled_forward = [shape.pop("sampled_forward") for shape in shapes][config.warmup_steps:]
    sampled_prefix = [shape.pop("sampled_prefix") for shape in shapes][config.warmup_steps:]
    # and took every row's logits from it (looked at after the run: the rollout only keeps them)
    kept = [shape.pop("sampled_products") for shape in shapes][config.warmup_steps:]
    sampled_logits = [products is not None and bool(products.logits_taken.all()) for products in kept]
    # and every layer's attention output, for every row
    sampled_attention = [products is not None and 0 < products.attentions_sealed == products.attentions_taken
                         for products in kept]
    rows = [{"step": m["step_time_s"], "tokens": m["tokens_per_second"] * m["step_time_s"],
             "generation": m["rollout_time_s"], "scoring": m["score_time_s"], "logprobs": m["logprob_time_s"],
             "update": m["update_time_s"], **shape} for m, shape in zip(metrics, shapes)]
    run_facts = {"no_grad_passes": int(trainer.passes.old) + int(trainer.passes.reference),
                 "shared_prompt": bool(trainer.unwrapped.share_prompt_prefix),
                 "sampled_forward": bool(sampled_forward) and all(sampled_forward),
                 "sampled_prefix": bool(sampled_prefix) and all(sampled_prefix),
                 "sampled_logits": bool(sampled_logits) and all(sampled_logits),
                 "sampled_attention": bool(sampled_attention) and all(sampled_attention)}
    return rows[config.warmup_steps:], run_facts


def ours_config(algorithm: str, config: BenchmarkConfig, output_dir: Path, max_steps: int) -> Any:
    """The RLConfig of our ``algorithm`` doing the benchmark's work: one update per rollout, no KL term."""
    from rlhf.cli import ALGORITHM_DEFAULTS
    from rlhf.config import RLConfig

    grouped = algorithm == "grpo"
    return RLConfig(**{
        **ALGORITHM_DEFAULTS[algorithm],
        "model_name_or_path": config.model, "output_dir": str(output_dir), "dataset": "builtin:prompts",
        "reward_funcs": ["sentiment"], "max_steps": max_steps,
        "rollout_batch_size": config.prompts_per_step if grouped else config.sequences,
        "num_generations": config.num_generations if grouped else 1, "mini_batch_size": config.sequences,
        "ppo_epochs": 1, "max_new_tokens": config.max_new_tokens, "learning_rate": config.learning_rate,
        "lora_r": config.lora_r, "lora_alpha": 2 * config.lora_r, "kl_coef": 0.0, "save_steps": 0,
        "num_samples_to_log": 0, "seed": config.seed, "report_to": ["jsonl"], "bf16": config.bf16,
    })


def _record_rollout_shapes(trainer: Any) -> list[dict[str, Any]]:
    """The padded prompt and response lengths of each step's rollout, as the trainer makes them, and
    whether it kept the sampler's products (its ``SampledProducts``, to see later which the update took)."""
    shapes: list[dict[str, Any]] = []
    rollout = trainer.rollout

    def recorded() -> Any:
        batch = rollout()
        response = batch.response_ids.shape[1]
        shapes.append({"prompt_length": batch.input_ids.shape[1] - response, "response_length": response,
                       "sampled_forward": batch.sampled_products is not None,
                       "sampled_prefix": batch.sampled_products is not None and bool(batch.sampled_products.prefixes),
                       "sampled_products": batch.sampled_products})
        return batch
    trainer.rollout = recorded
    return shapes


def _profile_one_step(trainer: Any, warmup_steps: int, table_path: Path) -> None:
    """Profile the trainer's step number warmup_steps + 1 with each phase under its own label."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    for phase in ("rollout", "score", "make_experience", "update"):
        method = getattr(trainer, phase)

        def labelled(*args: Any, _method: Any = method, _phase: str = phase, **kwargs: Any) -> Any:
            with record_function(f"## {_phase}"):
                return _method(*args, **kwargs)
        setattr(trainer, phase, labelled)
    train_step = trainer.train_step

    def profiled_step() -> dict[str, float]:
        if trainer.step != warmup_steps:
            return train_step()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            metrics = train_step()
        averages = profiler.key_averages()
        table = averages.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60)
        # A short phase (scoring takes milliseconds) can fall below the top 40 rows; list all four.
        phases = "\n".join(f"{event.key:<40} {event.cpu_time_total / 1e3:12.1f} ms" for event in averages
                           if event.key.startswith("## "))
        table_path.write_text(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
                              f"phases are the '## ' rows (CPU total includes children)\n{table}\n"
                              f"phases (CPU total):\n{phases}\n")
        return metrics
    trainer.train_step = profiled_step


def trl_sentiment_reward(scored: Any) -> Any:
    """Our built-in sentiment reward as a TRL reward function; ``scored(values, seconds)`` after each call."""
    from reward_models import CombinedReward

    sentiment = CombinedReward(["sentiment"])

    def sentiment_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        start = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        values = sentiment([""] * len(texts), texts).total
        scored(values, time.perf_counter() - start)
        return values
    return sentiment_reward


def trl_grpo_trainer(config: BenchmarkConfig, output_dir: Path, reward: Any, max_steps: int, **args: Any) -> Any:
    """TRL's GRPOTrainer doing the benchmark's work with ``reward`` (a TRL reward function): one
    update per rollout, no KL term, the same LoRA, sampling and learning rate; ``args``: further
    GRPOConfig settings."""
    from peft import LoraConfig
    from trl import GRPOTrainer

    from rlhf.data import prompt_text
    from rlhf.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    # as ours formats them (rlhf.data.format_prompt): a user message through the chat template, or
    # the plain text where the tokenizer has none (a base model), which TRL then takes as it is
    dataset = builtin_train_prompts().map(
        lambda row: {"prompt": [{"role": "user", "content": prompt_text(row["prompt"])}] if tokenizer.chat_template
                     else prompt_text(row["prompt"])})
    return GRPOTrainer(
        model=load_base_model(config.model, bf16=config.bf16), reward_funcs=reward,
        args=trl_grpo_settings(config, output_dir, max_steps, **args), train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
    )


def trl_grpo_settings(config: BenchmarkConfig, output_dir: Path, max_steps: int, **args: Any) -> Any:
    """The GRPOConfig of ``trl_grpo_trainer``: on the GPU where there is one, as our trainer's
    Accelerator chooses, else the CPU."""
    import torch
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir), use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
        logging_steps=1, bf16=config.bf16, gradient_checkpointing=False, seed=config.seed, max_steps=max_steps,
        per_device_train_batch_size=config.sequences, generation_batch_size=config.sequences,
        num_generations=config.num_generations, max_completion_length=config.max_new_tokens, temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=config.learning_rate, beta=0.0, num_iterations=1, disable_dropout=True,
        # transformers holds the stop tokens' logits at -inf until max_new_tokens: full-length rows
        generation_kwargs={"min_new_tokens": config.max_new_tokens} if config.full_length else None, **args,
    )


def run_trl_grpo(config: BenchmarkConfig, output_dir: Path) -> list[dict[str, float]]:
    from transformers import TrainerCallback

    timers: dict[str, float] = {"generation": 0.0, "scoring": 0.0, "generate_and_score": 0.0}

    def scored(values: list[float], seconds: float) -> None:
        timers["scoring"] += seconds

    trainer = trl_grpo_trainer(config, output_dir, trl_sentiment_reward(scored), config.warmup_steps + config.steps)

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - start
        return wrapper

    trainer._generate = timed("generation", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    rows: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()
            timers.update(generation=0.0, scoring=0.0, generate_and_score=0.0)

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step = time.perf_counter() - self.start
            rows.append({"step": step, "generation": timers["generation"], "scoring": timers["scoring"],
                         "logprobs": timers["generate_and_score"] - timers["generation"] - timers["scoring"],
                         "update": step - timers["generate_and_score"], "tokens": math.nan})

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "completions/mean_length" in logs and rows:
                rows[-1]["tokens"] = logs["completions/mean_length"] * config.sequences

    trainer.add_callback(StepTimer())
    trainer.train()
    return rows[config.warmup_steps:]


def run_floor(config: BenchmarkConfig) -> dict[str, float]:
    """Bare transformers ``generate`` (LoRA unmerged, every prompt prefilled in full, all
    max_new_tokens), one no-grad forward and one forward+backward of the plain model (no shared
    prompts) on one batch of the benchmark's shape: what a step costs done the ordinary way."""
    import torch

    from rlhf.data import adds_special_tokens, format_prompt
    from rlhf.models import PolicyWithValue, add_lora, load_base_model, load_tokenizer, stop_token_ids
    from rlhf.rollout import Rollout, forward_response, response_mask

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    stops = stop_token_ids(config.model, tokenizer)
    model = PolicyWithValue(add_lora(load_base_model(config.model, bf16=config.bf16), config.lora_r, 2 * config.lora_r, 0.0,
                                     ["all-linear"]), None)
    prompts = builtin_train_prompts()["prompt"][:config.prompts_per_step]
    texts = [format_prompt(p, tokenizer) for p in prompts for _ in range(config.num_generations)]

    encoded = tokenizer(texts, padding=True, add_special_tokens=adds_special_tokens(tokenizer), return_tensors="pt")

    def generate() -> Any:
        """transformers' own generate on the LoRA model, as anyone would call it."""
        sequences = model.policy.generate(
            **encoded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=config.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
            min_new_tokens=config.max_new_tokens if config.full_length else 0,
        )
        response = sequences[:, encoded["input_ids"].shape[1]:]
        mask, eos_found = response_mask(response, stops)
        return Rollout(input_ids=sequences, attention_mask=torch.cat([encoded["attention_mask"], mask.long()], 1),
                       response_ids=response, mask=mask, eos_found=eos_found, group_ids=torch.arange(len(texts)),
                       prompts=texts, completions=[""] * len(texts))

    timings: dict[str, list[float]] = {"generate_s": [], "forward_no_grad_s": [], "forward_backward_s": []}
    for repeat in range(config.warmup_steps + config.steps):
        start = time.perf_counter()
        with torch.no_grad():
            rollout = generate()
        generate_time = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            forward_response(model, rollout, slice(None), 1.0)
        no_grad_time = time.perf_counter() - start
        start = time.perf_counter()
        logprobs, _, _ = forward_response(model, rollout, slice(None), 1.0)
        (logprobs * rollout.mask).sum().backward()
        model.zero_grad()
        backward_time = time.perf_counter() - start
        if repeat >= config.warmup_steps:
            timings["generate_s"].append(generate_time)
            timings["forward_no_grad_s"].append(no_grad_time)
            timings["forward_backward_s"].append(backward_time)
    floor = {key: statistics.median(values) for key, values in timings.items()}
    floor["floor_step_s"] = floor["generate_s"] + floor["forward_backward_s"]
    return floor


def run_machine(config: BenchmarkConfig) -> dict[str, Any]:
    """This machine's limits at the shapes of ``config``'s step (rlhf.roofline.measure_machine)."""
    from rlhf.roofline import measure_machine

    # The GEMM rate is flat past a few hundred rows; a full-batch LM head GEMM would take seconds.
    batch_rows = min(512, config.sequences * (min(config.sweep_lengths) + 1))
    return dataclasses.asdict(measure_machine(model_shape(config.model), config.sequences, batch_rows))


def parameter_count(model: str) -> int:
    """Parameters of ``model`` (a tied tensor once), counted on the meta device: no weights load."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config(model)).parameters())


def model_shape(model: str) -> Any:
    """rlhf.roofline's shape of ``model``; ConfigError (one line) for a model it does not count
    right (mixture of experts, ungated MLP, recurrent layers): its bound would be wrong."""
    from rlhf.roofline import ModelShape

    config = model_config(model)
    kind = getattr(config, "model_type", type(config).__name__)
    try:
        shape = ModelShape.from_config(config)
    except AttributeError as exc:  # no attention heads, no intermediate_size (Mamba, GPT-2)
        problem = f"its config has no {str(exc).split('attribute')[-1].strip()}"
    else:
        try:
            problem = shape.matrix_weights_of(config)
        except Exception as exc:  # custom code, a config transformers cannot build a model from
            problem = f"building it on the meta device to check failed ({one_line(exc)})"
    if problem:
        raise ConfigError(f"--roofline counts the work of dense Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, "
                          f"Phi-3); {model} ({kind}) is not one: {problem}. Drop --roofline for this model")
    return shape


def _child(system: str, config_dict: dict[str, Any], workdir: str, queue: Any) -> None:
    from rlhf.cpu_memory import allocator_in_use, keep_freed_memory

    config = BenchmarkConfig(**config_dict)
    try:
        keep_freed_memory()  # every system alike, TRL's too: ours would otherwise have it from its trainer
        if system == "machine":
            queue.put((run_machine(config), None))
            return
        if system == "floor":
            result: Any = run_floor(config)
        elif system == "profile":
            run_ours("grpo", dataclasses.replace(config, steps=1), Path(workdir) / "run",
                     profile_to=unfinished_profile(Path(config.out)))
            result = {}
        elif system == "trl-grpo":
            result = _summarise(run_trl_grpo(config, Path(workdir) / "run"), config.sequences)
        else:
            rows, facts = run_ours(system.split("-", 1)[1], config, Path(workdir) / "run")
            result = {**_summarise(rows, config.sequences), **facts}
        result["peak_rss_mb"] = _peak_rss_mb()
        result.update(_gpu_facts())
        if system in SYSTEMS:  # what this trainer's process got, for the table's note
            result["malloc"] = allocator_in_use()
        if system.startswith("ours-"):
            from rlhf.decode_linear import library, vector_width

            # the width it was built for (reports before the AVX2 build say "on": AVX-512)
            result["decode_kernel"] = vector_width() if library() is not None and not config.bf16 else "off"
        queue.put((result, None))
    except Exception as exc:  # reported in the table, the other systems still run
        queue.put((None, one_line(exc)))


def run_in_child(system: str, config: BenchmarkConfig) -> dict[str, Any]:
    """One system in a fresh interpreter (RSS and caches are its own); {"error": ...} if it failed."""
    # The work folder is the parent's: a system killed mid-run (out of memory) cannot remove its own.
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as workdir:
        result, error = run_process(_child, system, dataclasses.asdict(config), workdir)
    group = f", group {config.num_generations}" if system.endswith("-grpo") else ""  # the others sample one per prompt
    where = system if system == "machine" else (
        f"{system} ({shown_model(config.model)}, {config.max_new_tokens} new tokens{group})")
    print(f"{where}: {'error: ' + error if error else 'done'}", flush=True)
    return result if error is None else {"error": error}


def shown_model(model: str) -> str:
    """``model`` as the user named it: a random model's spec, not the temporary dir it was written to."""
    from rlhf.random_models import PREFIX, RANDOM_DIR_PREFIX

    path = Path(model)
    return f"{PREFIX}{path.name}" if path.parent.name.startswith(RANDOM_DIR_PREFIX) else model


def run_process(target: Any, *args: Any) -> tuple[Any, str | None]:
    """``target(*args, queue)`` in a fresh (spawned) interpreter, which answers (result, error)
    on the queue; a process that ends without answering (killed by the kernel for memory, by a
    signal) gives (None, why) instead of a wait that never ends."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    try:
        while True:
            try:
                answer = queue.get(timeout=5)
                break
            except queues.Empty:
                if not process.is_alive() and queue.empty():
                    answer = (None, f"its process {ended(process.exitcode)} without a result")
                    break
    except BaseException:  # the benchmark is stopping (Ctrl-C, SIGTERM): the system's process stops too
        stop_process(process)  # nothing of it is kept here
        raise
    process.join()
    return answer


def ended(exitcode: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"ended with exit code {exitcode}"


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: a system's error is one row of the table and one line of stderr."""
    first = first_line(exc)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message ('' if none)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


@contextlib.contextmanager
def stopping_on_sigterm() -> Iterator[None]:
    """Inside, SIGTERM exits the benchmark (code 143) through ``run_process``'s cleanup, so the
    system's process it waits on does not train on alone (SIGTERM otherwise ends the parent only)."""
    def stop(signum: int, frame: Any) -> None:
        print("stopped by SIGTERM", file=sys.stderr)
        raise SystemExit(128 + signum)
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """The systems at each of config.sweep_lengths (or, with ``grow``, the growth study; with
    ``learning``, the race); ConfigError when every system failed. Writes only --profile's table
    in progress (``unfinished_profile``); ``benchmark_to_files`` checks the inputs first and
    writes the results."""
    from rlhf.cpu_memory import malloc_choice
    from rlhf.random_models import materialised

    requested = malloc_choice()  # a bad RLHF_CPU_MALLOC stops here, not in each system's process
    with materialised([config.model, *(config.grow_models if config.grow else [])], config.seed) as paths:
        if config.learning:
            from rlhf.learning_race import run_learning_race

            report = run_learning_race(config, paths[config.model])
        else:
            report = run_growth(config, paths) if config.grow else run_sweep(config, paths[config.model])
    failure = every_system_failed(report)
    if failure:  # an error-only table must not take the place of an earlier run's results
        raise ConfigError(f"every system failed, nothing written (the first: {failure})")
    # What the systems' processes got (a preloaded jemalloc, a failed switch), not what was asked for
    allocators = sorted(set(_values_of("malloc", report)))
    kernels = sorted(set(_values_of("decode_kernel", report)))
    return {**report, "malloc": ", ".join(allocators) or requested,
            **({"decode_kernel": ", ".join(kernels)} if kernels else {})}


def benchmark_to_files(config: BenchmarkConfig) -> tuple[dict[str, Any], str, list[Path]]:
    """Check the inputs, run, write the report at --out: (report, table, files written).

    An earlier run's files at --out (and an earlier race's runs) give way only once this run's
    report is written; a run that fails or is stopped (Ctrl-C, SIGTERM) before that leaves them
    as they were and nothing of its own (its --profile table, the folders it made, its race runs).
    """
    from rlhf.benchmark_report import write_report
    from rlhf.cpu_memory import malloc_choice
    from rlhf.learning_race import set_aside_earlier_race, settle_runs

    malloc_choice()  # a bad RLHF_CPU_MALLOC before the other checks, as before any system
    out = Path(config.out)
    made = check_inputs(config)
    profile = unfinished_profile(out)
    profile.unlink(missing_ok=True)  # a killed run's
    try:
        if config.learning:
            set_aside_earlier_race(out)
        report = run_benchmark(config)
        table, written = write_report(report, out)
    except BaseException:
        profile.unlink(missing_ok=True)
        if config.learning:
            settle_runs(out)  # the earlier race's runs back (unless this race's report got written)
        if made is not None and not any(path.is_file() for path in made.rglob("*")):
            shutil.rmtree(made, ignore_errors=True)
        raise
    profile_path = output_paths(out)["profile"]
    final_profile = through_link(profile_path)
    if config.profile and profile.exists():
        profile.replace(final_profile)
        written.append(profile_path)
    elif config.profile:  # its process failed (the report says why): no earlier run's table beside this report
        final_profile.unlink(missing_ok=True)
    elif profile_path.is_file() and not profile_path.is_symlink():  # an earlier run's table (a link made there stays)
        profile_path.unlink()
    if config.learning:
        settle_runs(out)  # the earlier race's runs go
    return report, table, written


def through_link(path: Path) -> Path:
    """The file a symlink at ``path`` points to (a result written there keeps the link), else ``path``."""
    return path.resolve() if path.is_symlink() else path


def check_inputs(config: BenchmarkConfig) -> Path | None:
    """Refuse, in one line and before anything runs or is written, what would otherwise fail in
    every system's process: an --out that cannot take the results, a bad RLHF_CPU_LINEAR or
    RLHF_CPU_DECODE_KERNEL, a model whose config does not load, a response length beyond the
    model's positions (``run_sweep`` refuses a model the roofline cannot count). Then --out's
    folder exists (--profile writes there while running); returns the outermost folder made for it
    (None: it was there), for ``benchmark_to_files`` to take back if nothing gets written."""
    import torch

    from rlhf.cpu_linear import use_onednn
    from rlhf.decode_linear import kernel_choice
    from rlhf.learning_race import holds_another_folder, runs_dir, unmatched_race_runs

    out = Path(config.out)
    if not out.name or out.name == "..":  # "", ".", "/", "..": a folder, where the JSON would be a file
        raise ConfigError(f"--out {config.out!r} names a folder, not the JSON file the results go to "
                          "(e.g. --out bench.json)")
    if out.suffix.lower() in (".md", ".png"):
        raise ConfigError(f"--out names the JSON results, and the table (.md) and plot (.png) go beside it: "
                          f"give it another suffix than {out.suffix} (e.g. {out.with_name(out.stem + '.json')})")
    written = [path for kind, path in output_paths(out).items() if kind != "profile" or config.profile]
    taken = [path for path in written if path.is_dir()]
    if taken:
        raise ConfigError(f"--out {out}: {taken[0]} is a folder, where the run would write a file; choose another --out")
    for path in written:
        special = special_file(path)
        if special:
            raise ConfigError(f"--out {out}: {path} is {special}, where the run writes a file of its own (the "
                              "JSON, with the table and plot beside it; the table is printed too): choose another --out")
    if not out.exists() and not out.is_symlink():
        # a table, plot or op table with no JSON at --out is another report's, whose --out had this
        # stem (``x/b`` after ``x/b.json``): until 2026-12-08 this run replaced it, the other JSON kept
        another = next((path for kind, path in output_paths(out).items()
                        if kind != "json" and path.is_file() and not path.is_symlink()), None)
        if another is not None:
            raise ConfigError(f"--out {out}: {another} is there without {out.name}, so it is another report's (an "
                              f"--out with the stem {out.stem!r}), and this run would replace it; choose another "
                              "--out, or move that file away")
    runs = runs_dir(out)
    if config.learning and runs.is_symlink():  # the race renames and deletes its runs folder: never a link's target
        raise ConfigError(f"--out {out}: {runs} is a link, where the race keeps its runs in a folder of its own; "
                          "remove it or choose another --out")
    if config.learning and runs.exists() and not runs.is_dir():
        raise ConfigError(f"--out {out}: {runs} is a file, where the race keeps its runs; choose another --out")
    unmatched = unmatched_race_runs(out) if config.learning else None
    if unmatched:
        raise ConfigError(f"--out {out}: {runs} holds an earlier race's runs (adapters, metrics) but {unmatched}, "
                          "and the race would delete them; restore that file, or move the folder away")
    if config.learning and holds_another_folder(out):
        raise ConfigError(f"--out {out}: {runs} is not empty and holds no earlier race's runs, and the race "
                          "would replace that folder; move it or choose another --out")
    if config.roofline and torch.cuda.is_available():  # our Accelerator and TRL's trainer take the GPU
        raise ConfigError("roofline measures this machine's CPU (fp32 GEMM rates, memory bandwidth), and here the "
                          "systems train on the GPU: drop --roofline")
    if config.learning and config.eval_num_prompts is not None:
        from rlhf.data import load_prompt_dataset
        from rlhf.learning_race import EVAL_SPLIT

        held_out = len(load_prompt_dataset("builtin:prompts", EVAL_SPLIT))
        if config.eval_num_prompts > held_out:  # the evaluation would take all of them and say so only in its table
            raise ConfigError(f"eval_num_prompts {config.eval_num_prompts} is more than the {held_out} held-out prompts "
                              f"of builtin:prompts ({EVAL_SPLIT} split): choose at most {held_out}")
    if config.learning or ("trl-grpo" in config.systems and not config.grow):
        prompts = len(builtin_train_prompts())
        if config.prompts_per_step > prompts:  # TRL's sampler drops an incomplete batch: no step at all
            raise ConfigError(f"prompts_per_step {config.prompts_per_step} is more than the {prompts} prompts of "
                              "builtin:prompts, and TRL's GRPOTrainer takes a step's prompts without repeating any "
                              "(it would train no step): choose a smaller --prompts_per_step")
    existing = next(folder for folder in (out.parent, *out.parent.parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder")
    use_onednn()  # a bad RLHF_CPU_LINEAR
    kernel_choice()  # a bad RLHF_CPU_DECODE_KERNEL
    prompt_budget = benchmark_prompt_budget()
    longest = max([*config.sweep_lengths, *([config.max_new_tokens] if config.grow else [])])
    for spec in dict.fromkeys([config.model, *(config.grow_models if config.grow else [])]):
        positions = model_positions(spec)
        if positions is not None and prompt_budget + longest > positions:
            raise ConfigError(f"{longest} new tokens after the benchmark's {prompt_budget}-token prompt budget need "
                              f"{prompt_budget + longest} positions, and {spec} has {positions} "
                              "(max_position_embeddings): choose shorter --lengths / --max_new_tokens")
    made = None if out.parent.exists() else next(
        folder for folder in (out.parent, *out.parent.parents) if folder.parent == existing)
    folder = out.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # where each file lands: beside --out, or where a symlink there points
        # the folder as the kernel finds it (tempfile would drop "x/.." before following x's link)
        for folder in dict.fromkeys(Path(os.path.realpath(through_link(path).parent)) for path in written):
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}."):
                pass
    except OSError as exc:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise ConfigError(f"--out {out}: cannot write in {folder} ({exc.strerror or exc})") from None
    return made


# the kernel's file systems, where a name is a device or a process's file, not a result's place
SPECIAL_FOLDERS = (Path("/dev"), Path("/proc"), Path("/sys"))
MEMORY_FOLDERS = (Path("/dev/shm"),)  # a tmpfs: an ordinary place for files


def special_file(path: Path) -> str | None:
    """What makes ``path`` no place for a result file, or None: an existing device, pipe or socket
    (the result would be written beside it and renamed over it), or a path in /dev (but /dev/shm),
    /proc or /sys, itself, through a linked folder or through a link (``/dev/stdout`` leads to
    whatever stdout was redirected to, which the result would replace). Until 2026-12-07
    ``--out /dev/null`` replaced the null device with a file.

    Each step resolves the folder as the kernel does (its links first, then ``..``), never by
    tidying the text: ``link-to-/dev/shm/../null`` is /dev/null (a reviewer's way past the first
    version of this check)."""
    seen: set[str] = set()
    current = os.path.join(os.getcwd(), path)  # not abspath: it drops "x/.." before x's link is followed
    while True:
        place = os.path.join(os.path.realpath(os.path.dirname(current)), os.path.basename(current))
        kernel = next((folder for folder in SPECIAL_FOLDERS if Path(place).is_relative_to(folder)), None)
        if kernel is not None and not any(Path(place).is_relative_to(folder) for folder in MEMORY_FOLDERS):
            if seen:
                return f"a link into {kernel}"
            named_there = Path(os.path.normpath(current)).is_relative_to(kernel)
            return f"in {kernel}" if named_there else f"a path into {kernel} (through a linked folder)"
        try:
            mode = os.lstat(place).st_mode
        except OSError:
            return None  # not there yet (or a dangling link): the write check says whether it can be made
        if not stat.S_ISLNK(mode):
            return None if stat.S_ISREG(mode) else "not a regular file (a device, pipe or socket)"
        if place in seen:
            return "a loop of links"
        seen.add(place)
        current = os.path.join(os.path.dirname(place), os.readlink(place))


def builtin_train_prompts() -> Any:
    """The prompts every system trains on (builtin:prompts' train split)."""
    from rlhf.data import load_prompt_dataset

    return load_prompt_dataset("builtin:prompts")


def output_paths(out: Path) -> dict[str, Path]:
    """The files a run writes at --out: the JSON, the table, the plot and --profile's op table."""
    return {"json": out, "table": out.with_suffix(".md"), "plot": out.with_suffix(".png"),
            "profile": out.with_suffix(".profile.txt")}


def unfinished_profile(out: Path) -> Path:
    """Where --profile's op table goes while the run is going (moved beside --out once it is written)."""
    return out.parent / f".{out.stem}.profile.txt.partial"


def model_positions(spec: str) -> int | None:
    """The positions (max_position_embeddings) of a model or ``random:`` shape; None if it has no such limit."""
    from rlhf.models import position_limit
    from rlhf.random_models import is_random, shape_of

    if is_random(spec):
        positions = shape_of(spec).get("max_position_embeddings")
        return positions if isinstance(positions, int) else None
    return position_limit(model_config(spec))


def model_config(model: str) -> Any:
    """The transformers config of ``model`` (a name, a dir); ConfigError (one line) if it does not load."""
    from transformers import AutoConfig

    from rlhf.models import resolve_model_path

    path = resolve_model_path(model)  # its own ConfigError for a missing dir
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # OSError, ValueError, a config field of the wrong type
        raise ConfigError(f"cannot load model {model!r}: {first_line(exc) or type(exc).__name__}") from None


def every_system_failed(report: dict[str, Any]) -> str | None:
    """The first error when every system's run in ``report`` failed (none ran), else None."""
    if report["kind"] == "sweep":
        results = [result for run in report["runs"] for name, result in run["results"].items() if name in SYSTEMS]
    elif report["kind"] == "growth":
        results = report["rows"]
    else:  # learning: the two trainers (the evaluation fails when neither left an adapter)
        results = list(report["results"].values())
    if not results:
        return "no system ran"
    if all("error" in result for result in results):
        return results[0]["error"]
    return None


def _values_of(key: str, tree: Any) -> Iterator[Any]:
    """Every value stored under ``key`` in nested dicts and lists (the children's results)."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            if name == key:
                yield value
            else:
                yield from _values_of(key, value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _values_of(key, value)


def run_sweep(config: BenchmarkConfig, model_path: str) -> dict[str, Any]:
    base = dataclasses.replace(config, model=model_path)
    report: dict[str, Any] = {"kind": "sweep", "settings": dataclasses.asdict(config), "runs": []}
    if config.roofline:
        model_shape(model_path)  # a model the roofline cannot count fails here, before any system runs
        check_full_attention(model_path, config.model, max(config.sweep_lengths))
        report["machine"] = run_in_child("machine", base)
    for index, length in enumerate(config.sweep_lengths):
        at = dataclasses.replace(base, max_new_tokens=length)
        extra = [*(["floor"] if config.floor else []), *(["profile"] if config.profile and index == 0 else [])]
        results = {system: run_in_child(system, at) for system in [*config.systems, *extra]}
        report["runs"].append({"max_new_tokens": length, "results": results, **compare(results)})
        if config.roofline and "error" not in report["machine"]:
            report["runs"][-1]["roofline"] = roofline_of(at, results.get("ours-grpo", {}), report["machine"])
    return report


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """ours-grpo over trl-grpo (samples/s, peak RSS, seconds of the step and each phase) and over the floor."""
    found: dict[str, Any] = {}
    ours, trl = results.get("ours-grpo", {}), results.get("trl-grpo", {})
    if "samples_per_second" in ours and "samples_per_second" in trl:
        keys = ("samples_per_second", "tokens_per_second", "step_time_s", *(f"{p}_s" for p in PHASES))
        found["ratios_ours_grpo_over_trl_grpo"] = {
            **{key: ours[key] / trl[key] if trl[key] else math.nan for key in keys},
            "peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        }
    if "step_time_s" in ours and "floor_step_s" in results.get("floor", {}):
        found["ours_grpo_step_over_floor"] = ours["step_time_s"] / results["floor"]["floor_step_s"]
    return found


def benchmark_prompt_budget() -> int:
    """The prompt budget every system's run gets: RLConfig's default max_prompt_length, which
    ours_config leaves as it is."""
    from rlhf.config import RLConfig

    return next(f.default for f in dataclasses.fields(RLConfig) if f.name == "max_prompt_length")


def check_full_attention(model: str, shown: str, longest: int) -> None:
    """ConfigError (one line) where ``model`` has sliding-window layers whose window the benchmark's
    sequences (the prompt budget and ``longest`` new tokens) may pass: rlhf.roofline counts every
    query against every earlier key and every row's whole KV cache read per decoded token, so there
    its bound would be too high and the share of it too flattering (Mistral's ``sliding_window``,
    Qwen2/3's ``use_sliding_window``, Gemma 2/3's local layers)."""
    text = model_config(model)
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None)
    no_window = not isinstance(window, int) or isinstance(window, bool)
    if no_window or (kinds is not None and "sliding_attention" not in kinds):
        return
    budget = benchmark_prompt_budget()
    if budget + longest > window:
        raise ConfigError(f"--roofline counts full causal attention, and {shown} has sliding-window layers of "
                          f"{window} tokens that {longest} new tokens after the benchmark's {budget}-token prompt "
                          f"budget may pass ({budget + longest}): drop --roofline"
                          + (f" or choose lengths up to {window - budget}" if window > budget else " for this model"))


def roofline_of(config: BenchmarkConfig, ours: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """Bounds of our GRPO step at the shapes it ran (rlhf.roofline) beside its measured phases."""
    from rlhf.roofline import Machine, StepShape, bounds_report

    if "prompt_length" not in ours:
        return {"error": "needs a measured ours-grpo run"}
    step = StepShape(groups=config.prompts_per_step, group_size=config.num_generations,
                     prompt_length=round(ours["prompt_length"]), response_length=round(ours["response_length"]),
                     lora_r=config.lora_r, no_grad_passes=ours["no_grad_passes"], shared_prompt=ours["shared_prompt"],
                     sampled_forward=bool(ours.get("sampled_forward")), sampled_prefix=bool(ours.get("sampled_prefix")),
                     sampled_logits=bool(ours.get("sampled_logits")),
                     sampled_attention=bool(ours.get("sampled_attention")))
    return bounds_report(model_shape(config.model), step, Machine(**machine), ours)


GROWTH_AXES = ("response length", "group size", "model")


def run_growth(config: BenchmarkConfig, paths: dict[str, str]) -> dict[str, Any]:
    """Our GRPO at each response length, group size and model, the other two settings held at
    config's; a point shared by two axes runs once."""
    points = [*(("response length", length, dataclasses.replace(config, max_new_tokens=length))
                for length in config.sweep_lengths),
              *(("group size", group, dataclasses.replace(config, num_generations=group))
                for group in config.grow_generations),
              *(("model", spec, dataclasses.replace(config, model=spec)) for spec in config.grow_models)]
    measured: dict[tuple[str, int, int], dict[str, Any]] = {}
    rows = []
    for axis, value, at in points:
        key = (at.model, at.max_new_tokens, at.num_generations)
        if key not in measured:
            measured[key] = run_in_child("ours-grpo", dataclasses.replace(at, model=paths[at.model]))
        rows.append({"axis": axis, "value": value, "model": at.model, "max_new_tokens": at.max_new_tokens,
                     "num_generations": at.num_generations, "parameters": parameter_count(paths[at.model]),
                     **measured[key]})
    return {"kind": "growth", "settings": dataclasses.asdict(config), "rows": rows}
