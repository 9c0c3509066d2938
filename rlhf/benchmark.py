"""Throughput side by side: this project's GRPO/PPO/REINFORCE against TRL's GRPOTrainer on the
same work (model, LoRA, prompts, group size, batch, response length, sampling, learning rate and
reward), one system per child process so each peak RSS is its own; warm-up steps are excluded.

Also ``--floor``: bare ``generate``, one no-grad forward and one forward+backward on one batch of
the same shape -- what a step cannot go below -- and our GRPO step as a multiple of it.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYSTEMS = ("ours-grpo", "ours-ppo", "ours-reinforce", "trl-grpo")
PHASES = ("generation", "scoring", "logprobs", "update")


@dataclass
class BenchmarkConfig:
    steps: int = field(default=3, metadata={"help": "Measured steps per system (after the warm-up)."})
    warmup_steps: int = field(default=1, metadata={"help": "Steps run first and not measured."})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Policy model for every system."})
    prompts_per_step: int = field(default=4, metadata={"help": "Prompts per step (PPO/REINFORCE: x num_generations)."})
    num_generations: int = field(default=4, metadata={"help": "Samples per prompt (the GRPO group)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Response length cap."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Same for every system."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2r, all linear layers)."})
    seed: int = field(default=0, metadata={"help": "Seed of every system."})
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS), metadata={"help": f"Any of {', '.join(SYSTEMS)}."})
    floor: bool = field(default=False, metadata={"help": "Also time generate / forward / forward+backward alone."})
    profile: bool = field(default=False, metadata={"help": "Also run ours-grpo once more under torch.profiler (its own "
                                                           "process, not in the table); the op table of the first step "
                                                           "after warm-up, phases labelled, goes next to --out."})
    out: str = field(default="bench.json", metadata={"help": "Where the JSON results go."})

    def __post_init__(self) -> None:
        from rlhf.errors import ConfigError

        for name in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ConfigError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.num_generations


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _summarise(rows: list[dict[str, float]], sequences: int) -> dict[str, Any]:
    step = statistics.median(r["step"] for r in rows)
    return {
        "steps_measured": len(rows),
        "step_time_s": step,
        "samples_per_second": sequences / step,
        "tokens_per_second": statistics.median(r["tokens"] / r["step"] for r in rows),
        **{f"{phase}_s": statistics.median(r[phase] for r in rows) for phase in PHASES},
    }


def run_ours(algorithm: str, config: BenchmarkConfig, output_dir: Path,
             profile_to: Path | None = None) -> list[dict[str, float]]:
    from rlhf.cli import ALGORITHM_DEFAULTS
    from rlhf.config import RLConfig
    from rlhf.trainer import RLTrainer

    grouped = algorithm == "grpo"
    run = RLConfig(**{
        **ALGORITHM_DEFAULTS[algorithm],
        "model_name_or_path": config.model, "output_dir": str(output_dir), "dataset": "builtin:prompts",
        "reward_funcs": ["sentiment"], "max_steps": config.warmup_steps + config.steps,
        "rollout_batch_size": config.prompts_per_step if grouped else config.sequences,
        "num_generations": config.num_generations if grouped else 1, "mini_batch_size": config.sequences,
        "ppo_epochs": 1, "max_new_tokens": config.max_new_tokens, "learning_rate": config.learning_rate,
        "lora_r": config.lora_r, "lora_alpha": 2 * config.lora_r, "kl_coef": 0.0, "save_steps": 0,
        "num_samples_to_log": 0, "seed": config.seed, "report_to": ["jsonl"],
    })
    trainer = RLTrainer(run)
    if profile_to is not None:
        _profile_one_step(trainer, config.warmup_steps, profile_to)
    trainer.train()
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": m["step_time_s"], "tokens": m["tokens_per_second"] * m["step_time_s"],
             "generation": m["rollout_time_s"], "scoring": m["score_time_s"], "logprobs": m["logprob_time_s"],
             "update": m["update_time_s"]} for m in metrics[config.warmup_steps:]]


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


def run_trl_grpo(config: BenchmarkConfig, output_dir: Path) -> list[dict[str, float]]:
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward_models import CombinedReward
    from rlhf.data import load_prompt_dataset, prompt_text
    from rlhf.models import load_base_model, load_tokenizer

    sentiment = CombinedReward(["sentiment"])
    timers: dict[str, float] = {"generation": 0.0, "scoring": 0.0, "generate_and_score": 0.0}

    def sentiment_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        start = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        values = sentiment([""] * len(texts), texts).total
        timers["scoring"] += time.perf_counter() - start
        return values

    dataset = load_prompt_dataset("builtin:prompts").map(
        lambda row: {"prompt": [{"role": "user", "content": prompt_text(row["prompt"])}]})
    args = GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        bf16=False, gradient_checkpointing=False, seed=config.seed, max_steps=config.warmup_steps + config.steps,
        per_device_train_batch_size=config.sequences, generation_batch_size=config.sequences,
        num_generations=config.num_generations, max_completion_length=config.max_new_tokens, temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=config.learning_rate, beta=0.0, num_iterations=1, disable_dropout=True,
    )
    trainer = GRPOTrainer(
        model=load_base_model(config.model), reward_funcs=sentiment_reward, args=args, train_dataset=dataset,
        processing_class=load_tokenizer(config.model),
        peft_config=LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
    )

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
                         "update": step - timers["generate_and_score"], "tokens": math_nan()})

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "completions/mean_length" in logs and rows:
                rows[-1]["tokens"] = logs["completions/mean_length"] * config.sequences

    trainer.add_callback(StepTimer())
    trainer.train()
    return rows[config.warmup_steps:]


def math_nan() -> float:
    return float("nan")


def run_floor(config: BenchmarkConfig) -> dict[str, float]:
    """Bare transformers ``generate`` (LoRA unmerged, every prompt prefilled in full, all
    max_new_tokens), one no-grad forward and one forward+backward of the plain model (no shared
    prompts) on one batch of the benchmark's shape: what a step costs done the ordinary way."""
    import torch

    from rlhf.data import format_prompt, load_prompt_dataset
    from rlhf.models import PolicyWithValue, add_lora, load_base_model, load_tokenizer, stop_token_ids
    from rlhf.rollout import Rollout, forward_response, response_mask

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    stops = stop_token_ids(config.model, tokenizer)
    model = PolicyWithValue(add_lora(load_base_model(config.model), config.lora_r, 2 * config.lora_r, 0.0,
                                     ["all-linear"]), None)
    prompts = load_prompt_dataset("builtin:prompts")["prompt"][:config.prompts_per_step]
    texts = [format_prompt(p, tokenizer) for p in prompts for _ in range(config.num_generations)]

    encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")

    def generate() -> Any:
        """transformers' own generate on the LoRA model, as anyone would call it."""
        sequences = model.policy.generate(
            **encoded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=config.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
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


def _child(system: str, config_dict: dict[str, Any], queue: Any) -> None:
    config = BenchmarkConfig(**config_dict)
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as tmp:
        try:
            if system == "floor":
                result: Any = run_floor(config)
            elif system == "profile":
                run_ours("grpo", dataclasses.replace(config, steps=1), Path(tmp) / "run",
                         profile_to=Path(config.out).with_suffix(".profile.txt"))
                result = {}
            elif system == "trl-grpo":
                result = _summarise(run_trl_grpo(config, Path(tmp) / "run"), config.sequences)
            else:
                result = _summarise(run_ours(system.split("-", 1)[1], config, Path(tmp) / "run"), config.sequences)
            result["peak_rss_mb"] = _peak_rss_mb()
            queue.put((system, result, None))
        except Exception as exc:  # reported in the table, the other systems still run
            queue.put((system, None, f"{type(exc).__name__}: {exc}"))


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: RSS and caches are per system
    results: dict[str, Any] = {}
    for system in [*config.systems, *(["floor"] if config.floor else []), *(["profile"] if config.profile else [])]:
        queue = context.Queue()
        process = context.Process(target=_child, args=(system, dataclasses.asdict(config), queue))
        process.start()
        name, result, error = queue.get()
        process.join()
        results[name] = result if error is None else {"error": error}
        print(f"{name}: {'error: ' + error if error else 'done'}", flush=True)
    report = {"settings": dataclasses.asdict(config), "results": results}
    ours, trl = results.get("ours-grpo", {}), results.get("trl-grpo", {})
    if "samples_per_second" in ours and "samples_per_second" in trl:
        report["ratios_ours_grpo_over_trl_grpo"] = {
            "samples_per_second": ours["samples_per_second"] / trl["samples_per_second"],
            "peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        }
    if "step_time_s" in ours and "floor" in results and "floor_step_s" in results["floor"]:
        report["ours_grpo_step_over_floor"] = ours["step_time_s"] / results["floor"]["floor_step_s"]
    return report


def render_table(report: dict[str, Any]) -> str:
    columns = ("samples_per_second", "tokens_per_second", "step_time_s", *(f"{p}_s" for p in PHASES), "peak_rss_mb")
    lines = ["| system | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, result in report["results"].items():
        if name in ("floor", "profile"):
            continue
        if "error" in result:
            lines.append(f"| {name} | {result['error']} |")
            continue
        lines.append(f"| {name} | " + " | ".join(f"{result[c]:.3f}" for c in columns) + " |")
    if "ratios_ours_grpo_over_trl_grpo" in report:
        ratios = report["ratios_ours_grpo_over_trl_grpo"]
        lines.append(f"\nours-grpo / trl-grpo: samples/s x{ratios['samples_per_second']:.2f}, "
                     f"peak RSS x{ratios['peak_rss']:.2f}")
    if "floor" in report["results"]:
        floor = report["results"]["floor"]
        lines.append("floor: " + ", ".join(f"{k} {v:.3f}" for k, v in floor.items()))
    if "ours_grpo_step_over_floor" in report:
        lines.append(f"ours-grpo step / floor (generate + forward/backward): x{report['ours_grpo_step_over_floor']:.2f}")
    return "\n".join(lines)
