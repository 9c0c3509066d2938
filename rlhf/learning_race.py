"""Learning per second (issue 21, item 4): our GRPO and TRL's GRPOTrainer train for the same wall
time on the same work, each in its own process, then both adapters and the base model are
evaluated on the held-out prompts with rlhf.evaluate.

    python scripts/benchmark.py --learning true --seconds 600 --out race.json

The work is the throughput benchmark's (rlhf.benchmark.ours_config / trl_grpo_trainer: the
built-in prompts' train split, the sentiment reward, LoRA, group size, prompts per step, response
length, temperature 1, learning rate, one update per rollout, no KL term), except that responses
end at EOS, as in any training run, and TRL's learning rate is constant like ours (its default
decays linearly over max_steps). Time counts from the start of training, after the model has
loaded; each system stops at the first step boundary at or after ``seconds`` and saves its
adapter: ours through RLTrainer's own final save, TRL's through ``trainer.save_model``. The runs
and the evaluation report go to ``<out stem>-runs/``; the table (.md), the JSON and a plot of
training reward against wall time (.png) go beside --out (rlhf.learning_race_report).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from rlhf.benchmark import (BenchmarkConfig, one_line, ours_config, run_process, trl_grpo_trainer,
                            trl_sentiment_reward)
from rlhf.trainer import RLTrainer

SYSTEMS = ("ours-grpo", "trl-grpo")
EVAL_SPLIT = "eval"  # builtin:prompts' held-out prompts; training draws from its train split
STEP_CAP = 1_000_000  # max_steps of both runs: the time budget ends them long before
ADAPTER_DIR = "final"  # each run's adapter, under <out stem>-runs/<system>/


class TimeBudget:
    """Seconds of training allowed, counted from start(); ``clock`` is time.perf_counter unless a
    test gives a fake one."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.seconds, self.clock = seconds, clock
        self.started: float | None = None

    def start(self) -> None:
        self.started = self.clock()

    def elapsed(self) -> float:
        assert self.started is not None, "start() the budget when training starts"
        return self.clock() - self.started


class TimeUp(Exception):
    """Ends RLTrainer's step loop at a step boundary (TimedGRPO catches it and saves final/)."""


class TimedGRPO(RLTrainer):
    """Our trainer, stopped at the first step boundary at or after ``budget.seconds`` of training;
    then final/ is written by the trainer's own save_final, as at the end of max_steps. Records
    each step's end (seconds since the start, mean training reward) and the samples drawn."""

    def __init__(self, config: Any, budget: TimeBudget):
        super().__init__(config)
        self.budget = budget
        self.curve: list[dict[str, float]] = []
        self.samples_seen = 0

    def train(self) -> None:
        self.budget.start()
        try:
            super().train()
        except TimeUp:  # raised between two steps: the last step is complete and logged
            self.save_final()
            self.accelerator.end_training()

    def train_step(self) -> dict[str, float]:
        # The stop reads the time recorded at the last step's end, as TimeLimit does for TRL.
        if self.curve and self.curve[-1]["seconds"] >= self.budget.seconds:
            raise TimeUp
        metrics = super().train_step()
        self.curve.append({"step": self.step, "seconds": self.budget.elapsed(), "reward": metrics["reward_mean"]})
        return metrics

    def rollout(self) -> Any:
        batch = super().rollout()
        self.samples_seen += len(batch)
        return batch


class TimeLimit(TrainerCallback):
    """For TRL's Trainer: should_training_stop at the first step end at or after ``budget.seconds``
    of training (counted from on_train_begin). Its ``scored`` goes to the reward function
    (rlhf.benchmark.trl_sentiment_reward) and counts generation rounds, samples and rewards."""

    def __init__(self, budget: TimeBudget):
        self.budget = budget
        self.curve: list[dict[str, float]] = []
        self.generations = 0
        self.samples_seen = 0
        self._step_rewards: list[float] = []

    def scored(self, values: list[float], seconds: float) -> None:
        self.generations += 1
        self.samples_seen += len(values)
        self._step_rewards.extend(values)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.budget.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        elapsed = self.budget.elapsed()
        reward = statistics.fmean(self._step_rewards) if self._step_rewards else math.nan
        self._step_rewards = []
        self.curve.append({"step": state.global_step, "seconds": elapsed, "reward": reward})
        if elapsed >= self.budget.seconds:
            control.should_training_stop = True


def optimizer_steps(optimizer: Any) -> int:
    """Optimizer steps taken (AdamW's own count; a step our trainer took back is not in it)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # torch's, inside Accelerate's wrapper
    return max((int(state["step"]) for state in inner.state.values() if "step" in state), default=0)


def train_ours(config: BenchmarkConfig, run_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    trainer = TimedGRPO(ours_config("grpo", config, run_dir, STEP_CAP), TimeBudget(config.seconds))
    load_seconds = time.perf_counter() - start
    trainer.train()
    return {"steps": trainer.step, "optimizer_steps": optimizer_steps(trainer.optimizer),
            "samples": trainer.samples_seen, "trained_s": trainer.curve[-1]["seconds"], "load_s": load_seconds,
            "adapter": str(run_dir / ADAPTER_DIR), "curve": trainer.curve}


def train_trl(config: BenchmarkConfig, run_dir: Path) -> dict[str, Any]:
    limit = TimeLimit(TimeBudget(config.seconds))
    start = time.perf_counter()
    trainer = trl_grpo_trainer(config, run_dir, trl_sentiment_reward(limit.scored), STEP_CAP,
                               lr_scheduler_type="constant")
    load_seconds = time.perf_counter() - start
    trainer.add_callback(limit)
    trainer.train()
    adapter = run_dir / ADAPTER_DIR
    trainer.save_model(str(adapter))
    name_base_model(adapter, config.model)
    return {"steps": limit.generations, "optimizer_steps": trainer.state.global_step, "samples": limit.samples_seen,
            "trained_s": limit.curve[-1]["seconds"], "load_s": load_seconds, "adapter": str(adapter),
            "curve": limit.curve}


def name_base_model(adapter: Path, model: str) -> None:
    """Record ``model`` as the adapter's base, as our trainer does: TRL's save records the dir the
    weights were loaded from (for the embedded model a cache path of this machine), which
    rlhf.evaluate would take for another base than our adapter's."""
    path = adapter / "adapter_config.json"
    settings = json.loads(path.read_text())
    settings["base_model_name_or_path"] = model
    path.write_text(json.dumps(settings, indent=2))


def evaluate_adapters(config: BenchmarkConfig, runs: Path) -> dict[str, Any]:
    """Both adapters (those that were saved) and the base on the held-out prompts: reward, win rate
    against the base and KL to it, with bootstrap 95% intervals over prompts."""
    from rlhf.evaluate import BASE_LABEL, evaluate

    adapters = {system: str(runs / system / ADAPTER_DIR) for system in SYSTEMS
                if (runs / system / ADAPTER_DIR / "adapter_config.json").is_file()}
    if not adapters:
        raise RuntimeError("no adapter was saved: nothing to evaluate")
    report = evaluate(list(adapters.values()), "builtin:prompts", ["sentiment"], str(runs / "eval"),
                      include_base=True, num_samples=config.eval_num_samples, max_new_tokens=config.max_new_tokens,
                      seed=config.seed, num_prompts=config.eval_num_prompts, dataset_split=EVAL_SPLIT,
                      update_model_cards=False)
    label_of = {BASE_LABEL: "base", **{path: system for system, path in adapters.items()}}
    keys = ("reward", "win_rate_vs_base", "kl_per_sequence", "kl_per_token", "response_length", "eos_rate")
    results = {label_of[label]: {key: numbers[key] for key in keys if key in numbers}
               for label, numbers in report["checkpoints"].items()}
    found = {"num_prompts": report["settings"]["num_prompts"], "dataset_split": EVAL_SPLIT,
             "report": str(runs / "eval" / "report.md"), "results": results}
    if len(adapters) == 2:
        ours, trl = adapters["ours-grpo"], adapters["trl-grpo"]
        found["ours_grpo_over_trl_grpo_win_rate"] = report["pairwise_win_rate"][ours][trl]
    return found


TASKS: dict[str, Callable[[BenchmarkConfig, Path], dict[str, Any]]] = {
    "ours-grpo": train_ours, "trl-grpo": train_trl, "evaluate": evaluate_adapters}


def _child(task: str, config_dict: dict[str, Any], directory: str, results: Any) -> None:
    from rlhf.cpu_memory import allocator_in_use, keep_freed_memory

    try:
        keep_freed_memory()  # both systems and the evaluation alike (see rlhf.cpu_memory)
        result = TASKS[task](BenchmarkConfig(**config_dict), Path(directory))
        results.put(({**result, "malloc": allocator_in_use()}, None))  # what this process got, for the note
    except Exception as exc:  # reported in the table; the other system and the evaluation still run
        results.put((None, one_line(exc)))


def run_in_child(task: str, config: BenchmarkConfig, directory: Path) -> dict[str, Any]:
    """TASKS[task] in a fresh interpreter; {"error": ...} if it failed or its process died."""
    result, error = run_process(_child, task, dataclasses.asdict(config), str(directory))
    print(f"{task}: {'error: ' + error if error else 'done'}", flush=True)
    return result if error is None else {"error": error}


def runs_dir(out: Path) -> Path:
    """Where the runs and the evaluation of the race written to ``out`` go."""
    return out.parent / f"{out.stem}-runs"


def run_learning_race(config: BenchmarkConfig, model_path: str) -> dict[str, Any]:
    """Train each system for config.seconds, one after the other, then evaluate what each learned.
    An earlier race's runs at the same --out were set aside first (``set_aside_earlier_race``);
    the runs folder and the report carry the same race id (see ``settle_runs``)."""
    runs = runs_dir(Path(config.out))
    race_id = uuid.uuid4().hex
    runs.mkdir(parents=True, exist_ok=True)
    (runs / RACE_ID_FILE).write_text(race_id)
    race = dataclasses.replace(config, full_length=False)  # responses end at EOS, as in training
    on_model = dataclasses.replace(race, model=model_path)
    results = {system: run_in_child(system, on_model, runs / system) for system in SYSTEMS}
    report = {"kind": "learning", "race_id": race_id, "settings": dataclasses.asdict(race), "runs_dir": str(runs),
              "results": results}
    if all("error" in result for result in results.values()):
        return report  # nothing to evaluate (and the benchmark stops on it)
    return {**report, "evaluation": run_in_child("evaluate", on_model, runs)}


RACE_ID_FILE = ".race_id"


def earlier_race(out: Path) -> Path:
    """Where the runs of an earlier race at ``out`` wait while a new race runs."""
    return out.parent / f".{out.stem}-runs.previous"


def set_aside_earlier_race(out: Path) -> None:
    """Move the runs of the race whose report is at ``out`` (one folder, one rename) out of the new
    race's way, until ``settle_runs`` decides which runs stay."""
    settle_runs(out)  # what a race killed at any moment (SIGKILL) left
    if runs_dir(out).exists():
        runs_dir(out).rename(earlier_race(out))


def settle_runs(out: Path) -> None:
    """Keep the runs that belong to the report at ``out`` and nothing else: the set-aside runs of
    an earlier race come back if the report is still that race's (the new race failed or was
    stopped before its report was written), else they go; runs of a race without a report go.
    Runs and report belong together when they carry the same race id (none for races written
    before ids); deciding by the ids makes this right whatever moment a race was stopped at."""
    runs, previous = runs_dir(out), earlier_race(out)
    reported = _report_race_id(out)
    if previous.exists():
        if _race_id(previous) == reported and not (runs.exists() and _race_id(runs) == reported):
            shutil.rmtree(runs, ignore_errors=True)
            previous.rename(runs)
        else:
            shutil.rmtree(previous, ignore_errors=True)
    if runs.exists() and _race_id(runs) != reported:
        shutil.rmtree(runs, ignore_errors=True)


def holds_another_folder(out: Path) -> bool:
    """Whether the runs folder of a race at ``out`` is there and not a race's: files in it and no
    race id, unless the report at ``out`` is a race's written before race ids (its runs carry
    none). A race would set such a folder aside and then delete it (``settle_runs``), so
    ``check_inputs`` refuses it instead."""
    runs = runs_dir(out)
    if not runs.is_dir() or (runs / RACE_ID_FILE).exists() or not any(runs.iterdir()):
        return False
    report = _learning_report(out)
    return report is None or "race_id" in report


def unmatched_race_runs(out: Path) -> str | None:
    """Why the runs folder of a race at ``out`` holds a race's runs that cannot be matched to a
    report (the report at ``out`` is there but unreadable or not a race's, or the runs' race id is
    unreadable), or None. A race would delete such runs (``settle_runs``: runs without their
    report go), adapters included, so ``check_inputs`` refuses instead."""
    runs = runs_dir(out)
    if not (runs / RACE_ID_FILE).exists():
        return None
    try:
        (runs / RACE_ID_FILE).read_text()
    except (OSError, ValueError):
        return f"its race id ({runs / RACE_ID_FILE}) is unreadable"
    if out.exists() and _learning_report(out) is None:
        return f"{out} is there but is not a readable race report"
    return None


def _race_id(runs: Path) -> str | None:
    try:
        return (runs / RACE_ID_FILE).read_text().strip() or None
    except (OSError, ValueError):  # ValueError: not UTF-8 text
        return None


def _learning_report(out: Path) -> dict[str, Any] | None:
    """The race report at ``out``; None where there is none (no file, another kind, unreadable)."""
    try:
        report = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("kind") == "learning" else None


def _report_race_id(out: Path) -> str | None:
    report = _learning_report(out)
    return None if report is None else report.get("race_id")
