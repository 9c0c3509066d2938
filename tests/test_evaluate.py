"""scripts/evaluate.py, rlhf.evaluate and rlhf.report on the tiny model; plot_metrics.py.

Each script runs for real in a subprocess once (evaluate.py also under torchrun); the refusals
and bad-input cases call them in this process (run_here)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import FIXTURES, ROOT, assert_one_line_error, run_script
from rlhf.report import bootstrap_ci, distinct_n, render_markdown, win_rate

REWARD = f"{FIXTURES / 'rewards.py'}:char_diversity"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_adapter(model_dir, directory, seed):
    """A LoRA adapter with random B (so it changes the model), saved like a training run's final/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    run_a = root / "run_a"
    make_adapter(tiny_model_dir, run_a / "final", seed=1)
    (run_a / "metrics.jsonl").write_text("")
    step_dir = make_adapter(tiny_model_dir, root / "run_b" / "checkpoints" / "step-3", seed=2)
    return {"final": run_a / "final", "run_dir": run_a, "step": step_dir}


def eval_kwargs(**extra):
    return {"dataset": "builtin:prompts", "reward_funcs": [REWARD, "sentiment"], "include_base": True,
            "num_prompts": 5, "num_samples": 2, "max_new_tokens": 6, "seed": 3, **extra}


# --------------------------------------------------------------------------------- statistics


def test_bootstrap_ci_hand_checked():
    # Means of 4 draws from {1,1,1,0}: P(<=0)=1/256, P(<=.25)=13/256=.051, P(<=.75)=.684 ->
    # the 2.5% quantile is 0.25 and the 97.5% quantile is 1.0.
    assert bootstrap_ci([1.0, 1.0, 1.0, 0.0], seed=0, resamples=4000) == (0.25, 1.0)
    # Means of 2 draws from {0,1}: 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4 -> (0, 1).
    assert bootstrap_ci([0.0, 1.0], seed=5, resamples=4000) == (0.0, 1.0)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert bootstrap_ci([0.1, 0.4, 0.9, 0.3], seed=1) == bootstrap_ci([0.1, 0.4, 0.9, 0.3], seed=1)


def records(rewards_per_prompt):
    return [{"prompt_index": p, "sample_index": s, "reward": r}
            for p, rewards in enumerate(rewards_per_prompt) for s, r in enumerate(rewards)]


def test_win_rate_counts_ties_half():
    a = records([[1.0], [0.5], [0.2], [0.7]])
    b = records([[0.5], [0.5], [0.3], [0.7]])
    result = win_rate(a, b)  # win, tie, loss, tie -> (1 + .5 + 0 + .5) / 4
    assert result["rate"] == pytest.approx(0.5)
    assert 0.0 <= result["ci_low"] <= 0.5 <= result["ci_high"] <= 1.0
    assert win_rate(b, a)["rate"] == pytest.approx(0.5)
    # Samples of one prompt are averaged first: prompt 0 -> (1 + 0) / 2, prompt 1 -> 1.
    assert win_rate(records([[0.9, 0.1], [0.8, 0.8]]), records([[0.5, 0.5], [0.2, 0.2]]))["rate"] == pytest.approx(0.75)


def test_distinct_n():
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "b c"], 2) == pytest.approx(1.0)
    assert distinct_n(["x x x x"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["", "one"], 2) == 0.0


def test_markdown_marks_the_best_and_not_ties():
    numbers = {"reward": {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}, "rewards": {"r": {}}, "kl_per_sequence": {"mean": 0.0},
               "kl_per_token": 0.0, "response_length": 5.0, "eos_rate": 0.5, "distinct_1": 1.0, "distinct_2": 1.0,
               "base_perplexity": 10.0}
    better = {**numbers, "reward": {"mean": 0.7, "ci_low": 0.6, "ci_high": 0.8}, "kl_per_sequence": {"mean": 1.0},
              "kl_per_token": 0.1, "base_perplexity": 12.0}
    report = {"settings": {"num_prompts": 2, "dataset": "d", "dataset_split": "eval", "num_samples": 1,
                           "max_new_tokens": 4, "temperature": 1.0, "seed": 0, "reward_funcs": ["r"], "base_model": "m"},
              "checkpoints": {"base": numbers, "ckpt": better}, "pairwise_win_rate": {
                  "base": {"ckpt": {"rate": 0.25, "ci_low": 0.0, "ci_high": 0.5}},
                  "ckpt": {"base": {"rate": 0.75, "ci_low": 0.5, "ci_high": 1.0}}}}
    lines = render_markdown(report).splitlines()
    base_row = next(line for line in lines if line.startswith("| base |"))
    ckpt_row = next(line for line in lines if line.startswith("| ckpt |"))
    assert "**0.700 [0.600, 0.800]**" in ckpt_row and "**10.000**" in base_row
    assert "**1.000 |" not in base_row + ckpt_row  # equal distinct-n: nobody marked
    assert "| 1.000 | 0.100 |" in ckpt_row  # KL ranks trained checkpoints only: one alone is not "best"


# --------------------------------------------------------------------------------- determinism


def test_report_identical_across_batch_sizes(adapters):
    from rlhf.evaluate import evaluate

    checkpoints = [str(adapters["final"]), str(adapters["step"])]
    small = evaluate(checkpoints, batch_size=1, **eval_kwargs())
    large = evaluate(checkpoints, batch_size=7, **eval_kwargs())
    assert small == large
    assert set(small["checkpoints"]) == {"base", *checkpoints}
    assert small["checkpoints"]["base"]["kl_per_sequence"]["mean"] == 0.0
    assert small["checkpoints"][checkpoints[0]]["kl_per_sequence"]["mean"] > 0.0
    other_seed = evaluate(checkpoints, batch_size=7, **eval_kwargs(seed=4))
    assert other_seed["checkpoints"]["base"]["reward"] != small["checkpoints"]["base"]["reward"]


def test_sharded_sampling_equals_one_process(tiny_model_dir):
    from reward_models import CombinedReward
    from rlhf.data import load_prompt_dataset
    from rlhf.evaluate import sample_and_score
    from rlhf.models import load_base_model, load_tokenizer

    model, tokenizer = load_base_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = load_prompt_dataset("builtin:prompts", "eval")
    reward = CombinedReward([REWARD])
    settings = dict(base=None, num_samples=2, seed=9, max_new_tokens=6, batch_size=4)
    whole = sample_and_score(model, tokenizer, prompts, list(range(6)), reward, **settings)
    shards = [sample_and_score(model, tokenizer, prompts, list(range(6))[rank::3], reward, **settings)
              for rank in range(3)]
    merged = sorted((r for shard in shards for r in shard), key=lambda r: (r["prompt_index"], r["sample_index"]))
    assert merged == whole


# --------------------------------------------------------------------------------- the command


def test_script_writes_every_output_for_every_checkpoint_kind(adapters, tiny_model_dir, tmp_path):
    out = tmp_path / "report"
    checkpoints = [str(adapters["run_dir"]), str(adapters["step"]), str(tiny_model_dir)]
    result = run_script("evaluate.py", "--checkpoints", *checkpoints, "--include_base", "--dataset", "builtin:prompts",
                        "--reward_funcs", REWARD, "sentiment", "--output_dir", str(out), "--num_prompts", "4",
                        "--num_samples", "2", "--max_new_tokens", "6", "--seed", "3", "--batch_size", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["checkpoints"]) == ["base", *checkpoints]
    assert report["settings"]["seed"] == 3 and report["settings"]["num_prompts"] == 4
    assert {"torch", "transformers", "peft"} <= set(report["versions"])
    trained = report["checkpoints"][str(adapters["run_dir"])]
    for key in ("reward", "kl_per_sequence", "kl_per_token", "response_length", "eos_rate", "distinct_1",
                "distinct_2", "base_perplexity", "win_rate_vs_base"):
        assert key in trained, key
    assert set(trained["rewards"]) == {"char_diversity", "sentiment"}
    assert trained["reward"]["ci_low"] <= trained["reward"]["mean"] <= trained["reward"]["ci_high"]
    # The plain model dir is the base itself: same samples, KL 0, every comparison a tie.
    plain = report["checkpoints"][str(tiny_model_dir)]
    assert plain["reward"] == report["checkpoints"]["base"]["reward"] and plain["kl_per_token"] == 0.0
    assert plain["win_rate_vs_base"]["rate"] == 0.5

    markdown = (out / "report.md").read_text()
    assert all(f"| {label} |" in markdown for label in report["checkpoints"]) and "**" in markdown
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 2
    assert set(samples[0]["responses"]) == set(report["checkpoints"])
    for name in ("reward_distribution.png", "reward_vs_kl.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000

    # The Python API returns the same numbers.
    from rlhf.evaluate import evaluate

    again = evaluate(checkpoints, dataset="builtin:prompts", reward_funcs=[REWARD, "sentiment"], include_base=True,
                     num_prompts=4, num_samples=2, max_new_tokens=6, seed=3, batch_size=5)
    assert again["checkpoints"] == report["checkpoints"]
    assert again["pairwise_win_rate"] == report["pairwise_win_rate"]


def test_reward_weights_as_an_array_are_read_and_bad_ones_refused_before_any_work(adapters, tmp_path):
    """A reviewer's: evaluate(reward_weights=np.array(...)) evaluated everything, then wrote its
    report with a JSON TypeError traceback; a nan weight was taken (the report showed nan)."""
    import numpy as np

    from rlhf.errors import ConfigError
    from rlhf.evaluate import evaluate

    checkpoints = [str(adapters["final"])]
    common = {**eval_kwargs(include_base=False, num_prompts=2, num_samples=1, max_new_tokens=3)}
    as_list = evaluate(checkpoints, reward_weights=[1.0, 0.5], **common)
    as_array = evaluate(checkpoints, reward_weights=np.array([1.0, 0.5]), output_dir=str(tmp_path / "out"), **common)
    assert as_array["checkpoints"] == as_list["checkpoints"] and (tmp_path / "out" / "report.json").is_file()
    for weights, message in (([1.0, float("nan")], "reward_weights must be finite numbers within float32 range (|x| <= 3.4e38), got nan"),
                             ([1.0, 1e39], "got 1e+39"),  # was taken: rewards scaled to inf
                             (np.ones((2, 2)), "got an array of shape (2, 2)")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate(["no/such/checkpoint"], reward_weights=weights, **common)


def test_refuses_to_overwrite_a_report(adapters, tmp_path, run_here):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text("{}")
    result = run_here("evaluate.py", "--checkpoints", str(adapters["final"]), "--output_dir", str(out))
    assert_one_line_error(result, f"{out} already holds report.json, which a report would replace")
    assert (out / "report.json").read_text() == "{}"
    a_file = tmp_path / "a_file"  # a reviewer's: evaluated everything, then a FileExistsError traceback
    a_file.write_text("kept")
    result = run_here("evaluate.py", "--checkpoints", str(adapters["final"]), "--output_dir", str(a_file))
    assert_one_line_error(result, f"output_dir {a_file} is a file, not a folder")
    assert a_file.read_text() == "kept" and "prompts from" not in result.stderr + result.stdout


def test_refuses_to_overwrite_a_training_runs_samples(adapters, tmp_path, run_here):
    """A reviewer's find: --output_dir a training run's dir replaced the run's samples.jsonl with
    the evaluation's (only report.json was checked). Nothing is written unless asked."""
    run = tmp_path / "run"
    run.mkdir()
    training_rows = '{"step": 1, "prompt": "p", "completion": "c", "reward": 0.5}\n'
    (run / "samples.jsonl").write_text(training_rows)
    args = ["--checkpoints", str(adapters["final"]), "--output_dir", str(run), "--num_prompts", "1",
            "--num_samples", "1", "--max_new_tokens", "2", "--reward_funcs", REWARD]
    result = run_here("evaluate.py", *args)
    assert_one_line_error(result, f"{run} already holds samples.jsonl, which a report would replace",
                          "--overwrite_output_dir")
    assert sorted(p.name for p in run.iterdir()) == ["samples.jsonl"]
    assert (run / "samples.jsonl").read_text() == training_rows
    result = run_here("evaluate.py", *args, "--overwrite_output_dir", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"responses"' in (run / "samples.jsonl").read_text() and (run / "report.json").is_file()


def build_tiny_gpt2(directory, positions):
    """A 2-layer GPT-2 (learned position table of ``positions`` rows) with the fixture tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_prompt_and_response_beyond_the_models_positions_are_refused(adapters, tmp_path, run_here):
    """A reviewer's find: evaluate.py's defaults (256 + 64 tokens) on a GPT-2 of fewer positions
    stopped with an IndexError traceback in the sampler; training refuses them in one line. The
    model compared beside an adapter is checked too, before anything is sampled."""
    gpt2 = build_tiny_gpt2(tmp_path / "gpt2", positions=64)
    common = ["--output_dir", str(tmp_path / "out"), "--num_prompts", "2", "--reward_funcs", REWARD]
    for checkpoints in ([str(gpt2)], [str(adapters["final"]), str(gpt2)]):
        result = run_here("evaluate.py", "--checkpoints", *checkpoints, *common)
        assert_one_line_error(result, "max_prompt_length 256 + max_new_tokens 64 = 320 tokens exceeds the model's "
                                      "64 positions")
        assert "evaluate:" not in result.stderr  # refused before the sampling's progress bar
        assert not (tmp_path / "out").exists()
    result = run_here("evaluate.py", "--checkpoints", str(gpt2), *common, "--max_prompt_length", "56",
                      "--max_new_tokens", "8", "--num_samples", "1")
    assert result.returncode == 0, result.stderr[-2000:]


def test_prompts_cut_by_max_prompt_length_are_announced(adapters, tmp_path, run_here):
    """Training warns when max_prompt_length cuts prompts (their beginning goes); the evaluation
    only did so for tool episodes and cut plain prompts silently."""
    result = run_here("evaluate.py", "--checkpoints", str(adapters["final"]), "--output_dir", str(tmp_path / "out"),
                      "--num_prompts", "2", "--num_samples", "1", "--max_new_tokens", "2", "--reward_funcs", REWARD,
                      "--max_prompt_length", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 of 2 prompts are longer than max_prompt_length 4 tokens (longest" in result.stderr
    result = run_here("evaluate.py", "--checkpoints", str(adapters["final"]), "--output_dir", str(tmp_path / "out2"),
                      "--num_prompts", "2", "--num_samples", "1", "--max_new_tokens", "2", "--reward_funcs", REWARD)
    assert result.returncode == 0 and "longer than max_prompt_length" not in result.stderr


@pytest.mark.parametrize("case", ["missing_dir", "other_base", "empty_dataset", "malformed_row", "unknown_reward",
                                  "no_checkpoints", "bad_flag"])
def test_bad_input_exits_2_with_one_line(case, adapters, tiny_model_dir, tmp_path, run_here):
    args = ["--checkpoints", str(adapters["final"]), "--output_dir", str(tmp_path / "out"),
            "--num_prompts", "2", "--max_new_tokens", "4", "--reward_funcs", REWARD]
    expected = {
        "missing_dir": "checkpoint dir not found: ",
        "other_base": "was trained on base model",
        "empty_dataset": "empty.jsonl",
        "malformed_row": "row 1",
        "unknown_reward": "nonexistent_reward",
        "no_checkpoints": "at least one checkpoint",
        "bad_flag": "--nun_samples",
    }[case]
    if case == "missing_dir":
        args[1] = str(tmp_path / "run_x" / "final")
    elif case == "other_base":
        other = tmp_path / "other"
        shutil.copytree(adapters["final"], other)
        config = json.loads((other / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "some_other_model")
        (other / "adapter_config.json").write_text(json.dumps(config))
        args[1:2] = [str(adapters["final"]), str(other)]
    elif case == "empty_dataset":
        (tmp_path / "empty.jsonl").write_text("")
        args += ["--dataset", str(tmp_path / "empty.jsonl")]
    elif case == "malformed_row":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": ""}\n')
        args += ["--dataset", str(tmp_path / "bad.jsonl")]
    elif case == "unknown_reward":
        args[-1] = "nonexistent_reward"
    elif case == "no_checkpoints":
        args = args[2:]
    elif case == "bad_flag":
        args += ["--nun_samples", "2"]
    result = run_here("evaluate.py", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected.lstrip("-") in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "report.json").exists()


# --------------------------------------------------------------------------------- training curves


def test_plot_metrics_draws_curves_for_several_runs(tmp_path):
    for name, slope in (("ppo", 0.02), ("grpo", 0.03)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "reward_mean": 0.3 + slope * s, "kl": 0.1 * s, "policy_loss": -0.01 * s,
                 "value_loss": 0.05 if name == "ppo" else None, "response_length_mean": 20 + s,
                 **({"eval/reward_mean": 0.3 + slope * s} if s % 2 == 0 else {})} for s in range(1, 9)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_script("plot_metrics.py", str(tmp_path / "ppo"), str(tmp_path / "grpo"), "--output_dir",
                        str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("reward.png", "kl.png", "loss.png", "length.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_metrics_bad_run_dir_exits_2(tmp_path, run_here):
    result = run_here("plot_metrics.py", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: no metrics.jsonl in {tmp_path / 'nowhere'}"


def test_two_processes_give_the_one_process_report(adapters, tmp_path):
    """scripts/evaluate.py under torchrun on CPU: prompts sharded over a 2-process gloo group and
    gathered give the one-process report (both with one thread per process, so float reductions
    run in the same order), and only the main process writes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"report_{processes}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(29500 + processes + os.getpid() % 1000), str(ROOT / "scripts" / "evaluate.py"),
                   "--checkpoints", str(adapters["final"]), "--include_base", "--dataset", "builtin:prompts",
                   "--reward_funcs", "sentiment", "--num_prompts", "5", "--num_samples", "2", "--max_new_tokens", "6",
                   "--seed", "3", "--batch_size", "3", "--output_dir", str(out)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[processes] = json.loads((out / "report.json").read_text())
        assert len((out / "samples.jsonl").read_text().splitlines()) == 5 * 2
    assert reports[2]["settings"]["num_processes"] == 2 and reports[1]["settings"]["num_processes"] == 1
    assert reports[2]["checkpoints"] == reports[1]["checkpoints"]
    assert reports[2]["pairwise_win_rate"] == reports[1]["pairwise_win_rate"]


def test_evaluation_samples_with_trainings_speed_ups_and_the_same_numbers(tiny_model_dir):
    """sample_and_score samples through rlhf.rollout.sampling_speedups (LoRA folded, the forward
    without the module stack, shared prompt prefill), as training's rollout does: the same
    responses and rewards as the plain model's forward, KL and base NLL up to float rounding,
    and the policy's own weights untouched afterwards."""
    from reward_models import CombinedReward
    from rlhf.data import load_prompt_dataset
    from rlhf.evaluate import adapter_disabled, sample_and_score
    from rlhf.models import add_lora, load_base_model, load_tokenizer
    from rlhf.sampling_forward import SamplingForward

    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["all-linear"]).eval()
    # its own generator: drawn from the global one, the weights (and so whether some token is a
    # near-tie that float rounding flips) depended on which tests ran before in the process
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=generator)
    weights = {name: p.detach().clone() for name, p in policy.named_parameters()}
    prompts = load_prompt_dataset("builtin:prompts", "eval")
    settings = dict(base=lambda: adapter_disabled(policy), num_samples=3, seed=9, max_new_tokens=6, batch_size=6)
    fast_calls = []
    original_call = SamplingForward.__call__

    def counting_call(self, *args, **kwargs):
        fast_calls.append(kwargs["input_ids"].shape)
        return original_call(self, *args, **kwargs)

    SamplingForward.__call__ = counting_call
    try:
        fast = sample_and_score(policy, tokenizer, prompts, list(range(4)), CombinedReward([REWARD]), **settings)
        used = list(fast_calls)
        plain = sample_and_score(policy, tokenizer, prompts, list(range(4)), CombinedReward([REWARD]),
                                 **settings, speedups=False)
    finally:
        SamplingForward.__call__ = original_call
    assert used and len(fast_calls) == len(used)  # the fast forward ran, and only with speed-ups on
    assert (2, used[0][1]) in used  # the prefill: each chunk's two distinct prompts once (3 samples each)
    assert [r["response"] for r in fast] == [r["response"] for r in plain]
    assert any(r["kl"] > 1e-3 for r in plain)  # the adapter moves the policy: KL measures something
    for a, b in zip(fast, plain):
        assert a["reward"] == b["reward"] and a["tokens"] == b["tokens"]
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4) and a["base_nll"] == pytest.approx(b["base_nll"], abs=1e-4)
    for name, parameter in policy.named_parameters():
        assert torch.equal(parameter, weights[name]), name


def test_evaluation_calls_rewards_as_training_does_and_writes_prompts_with_the_runs_tokenizer(tiny_model_dir,
                                                                                              tmp_path):
    """A stranger's review: evaluate.py passed dataset columns as datasets Column objects (a reward
    that logs them as JSON failed), passed no trainer_state (a TRL-style scheduled reward failed),
    and wrote prompts with the base model's chat template, not the one the run trained with and
    saved with its adapter (a tokenizer without one, given through the Python API)."""
    from transformers import AutoTokenizer

    from rlhf.data import format_prompt
    from rlhf.errors import ConfigError
    from rlhf.evaluate import evaluate, resolve_candidate

    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "final", seed=1)
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain.chat_template = None
    plain.save_pretrained(run / "final")
    (run / "config.yaml").write_text("max_steps: 7\nreward_funcs: []\n")
    seen = []

    def scheduled(prompts, completions, trainer_state, answer, **kwargs):
        seen.append((type(answer), trainer_state.global_step, trainer_state.max_steps, prompts[0]))
        json.dumps(answer)
        return [float(trainer_state.global_step) / trainer_state.max_steps] * len(completions)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": i}) + "\n" for i in range(3)))
    report = evaluate([str(run / "final")], str(prompts), [scheduled], include_base=True, num_samples=1,
                      max_new_tokens=3)
    assert report["checkpoints"]["base"]["reward"]["mean"] == 1.0
    assert {entry[:3] for entry in seen} == {(list, 7, 7)}
    from rlhf.evaluate import _evaluation_tokenizer

    written = format_prompt("Say 0", _evaluation_tokenizer([resolve_candidate(str(run / "final"))], "base", False))
    assert written == "Say 0"  # the run's tokenizer has no template: the text as it is

    other = tmp_path / "other"
    make_adapter(tiny_model_dir, other / "final", seed=2)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other / "final")
    with pytest.raises(ConfigError, match="were trained with different chat templates"):
        evaluate([str(run / "final"), str(other / "final")], str(prompts), [scheduled], num_samples=1, max_new_tokens=3)
    unsaved = make_adapter(tiny_model_dir, tmp_path / "unsaved" / "checkpoints" / "step-1", seed=3)  # the base's template
    with pytest.raises(ConfigError, match="or the base model's where none was saved"):
        evaluate([str(unsaved), str(run / "final")], str(prompts), [scheduled], num_samples=1, max_new_tokens=3)


def test_a_runs_python_reward_functions_are_imported_again(tiny_model_dir, tmp_path):
    """A stranger's review: a run trained through the Python API records its function as
    'python:module.name'; evaluation tried to import a module called 'python'. An importable
    function loads again; one of a script run as __main__ (or a local one) is one line."""
    from rlhf.errors import ConfigError
    from rlhf.evaluate import evaluate

    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "final", seed=1)
    (run / "config.yaml").write_text("reward_funcs: [python:reward_models.builtins.sentiment]\n")
    report = evaluate([str(run / "final")], "builtin:prompts", None, num_prompts=2, num_samples=1, max_new_tokens=3)
    assert report["settings"]["reward_funcs"] == ["reward_models.builtins:sentiment"]
    (run / "config.yaml").write_text("reward_funcs: [python:__main__.charlen]\n")
    with pytest.raises(ConfigError, match="reward_funcs entry python:__main__.charlen was a Python object defined "
                                          "where it cannot be imported again; pass --reward_funcs"):
        evaluate([str(run / "final")], "builtin:prompts", None, num_prompts=2, num_samples=1, max_new_tokens=3)


def test_a_dataset_with_splits_is_evaluated_on_its_test_split(adapters, tmp_path, monkeypatch):
    """A reviewer's find: without --dataset_split a saved DatasetDict was evaluated on its train
    split (the prompts the run trained on), where training's periodic evaluation reads test. Data
    without a test split (a dir of one file) still gives its rows; a named split is read."""
    import datasets

    from rlhf import errors as rlhf_errors
    from rlhf.evaluate import evaluate

    def prompts_of(name, count):
        return datasets.Dataset.from_dict({"prompt": [f"{name} prompt {i}" for i in range(count)]})

    def evaluated_prompts(dataset, output_dir, **split):
        report = evaluate([str(adapters["final"])], str(dataset), [REWARD], str(output_dir), num_samples=1,
                          max_new_tokens=2, update_model_cards=False, **split)
        rows = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
        return report["settings"]["dataset_split"], [row["prompt"] for row in rows]

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": prompts_of("train", 3), "test": prompts_of("test", 2)}).save_to_disk(saved)
    assert evaluated_prompts(saved, tmp_path / "default") == ("test", ["test prompt 0", "test prompt 1"])
    assert evaluated_prompts(saved, tmp_path / "named", dataset_split="train")[1] == [f"train prompt {i}"
                                                                                      for i in range(3)]
    one_file = tmp_path / "one_file"
    one_file.mkdir()
    (one_file / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"only {i}"}) + "\n" for i in range(2)))
    assert evaluated_prompts(one_file, tmp_path / "one") == ("train", ["only 0", "only 1"])
    # a held-out split of another name is no reason to evaluate on the training prompts (a reviewer:
    # train + validation gave the 3 train prompts); it is refused as training's evaluation refuses it
    named_validation = tmp_path / "validation"
    datasets.DatasetDict({"train": prompts_of("train", 3), "validation": prompts_of("v", 2)}).save_to_disk(
        named_validation)
    with pytest.raises(rlhf_errors.DataError, match="has splits train, validation, not 'test'"):
        evaluated_prompts(named_validation, tmp_path / "validation-out")
    assert evaluated_prompts(named_validation, tmp_path / "v-out", dataset_split="validation")[0] == "validation"
    # a hub dataset of one split (as datasets refuses another split) gives its train rows too
    real_load = datasets.load_dataset

    def hub_of_one_split(name, config_name=None, split=None, **kwargs):
        if name != "someone/prompts":
            return real_load(name, config_name, split=split, **kwargs)
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return prompts_of("hub", 2)

    monkeypatch.setattr(datasets, "load_dataset", hub_of_one_split)
    assert evaluated_prompts("someone/prompts", tmp_path / "hub") == ("train", ["hub prompt 0", "hub prompt 1"])


def test_the_runs_prompt_column_is_read_where_the_dataset_has_it(tiny_model_dir, tmp_path):
    """A stranger's review: a run trained with prompt_column question was evaluated on its own
    data only with the flag given again ("no column 'prompt'"). Another dataset without that
    column still takes "prompt"."""
    from rlhf.evaluate import evaluate

    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "final", seed=1)
    (run / "config.yaml").write_text("prompt_column: question\nreward_funcs: [sentiment]\n")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Why {i}?"}) + "\n" for i in range(2)))
    report = evaluate([str(run / "final")], str(questions), None, num_samples=1, max_new_tokens=3)
    assert report["checkpoints"][str(run / "final")]["reward"]["mean"] is not None
    report = evaluate([str(run / "final")], "builtin:prompts", None, num_prompts=2, num_samples=1, max_new_tokens=3)
    assert report["checkpoints"][str(run / "final")]["reward"]["mean"] is not None
