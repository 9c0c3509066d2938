"""scripts/evaluate.py, rlhf.evaluate and the trainer's periodic evaluation on multi-turn tool
episodes (issue 24): a run trained with tools is evaluated with them, episodes are sampled with
per-(prompt, sample) seeds, the report counts tool use, and environments pay their reward as in
training. The model is tests/tool_model.py's tiny Llama fitted to call the example tools.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_in_process
from tool_model import TOOL_MODEL_TEMPERATURE

CALCULATOR_TOOL = "rlhf/examples/calculator.py:calculator"
GUESS_ENVIRONMENT = "rlhf/examples/number_guess.py:NumberGuess"
EXACT_ANSWER = ["--reward_funcs", "exact_answer", "--reward_kwargs", '{"exact_answer": {"column": "solution"}}']
SAMPLING = ["--max_new_tokens", "96", "--max_prompt_length", "512", "--temperature", str(TOOL_MODEL_TEMPERATURE),
            "--seed", "1"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def calculator_run(tool_model_dir, tmp_path_factory) -> Path:
    """A run trained 1 step with the calculator tool, evaluating itself once (eval_steps 1)."""
    out = tmp_path_factory.mktemp("calculator-run") / "run"
    result = run_in_process(
        "train_grpo.py", "--model_name_or_path", str(tool_model_dir), "--output_dir", str(out), "--max_steps", "1",
        "--rollout_batch_size", "2", "--num_generations", "2", "--mini_batch_size", "4", "--lora_r", "4",
        "--lora_alpha", "8", "--dataset", "builtin:calculator", "--tools", CALCULATOR_TOOL, *EXACT_ANSWER, *SAMPLING,
        "--eval_steps", "1", "--eval_num_prompts", "2")
    assert result.returncode == 0
    return out


def test_a_run_trained_with_tools_is_evaluated_with_its_tools(calculator_run, run_here, tmp_path):
    out = tmp_path / "eval"
    result = run_here("evaluate.py", "--checkpoints", str(calculator_run), "--dataset", "builtin:calculator",
                      "--num_prompts", "3", "--output_dir", str(out), *SAMPLING)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"episodes: tools {CALCULATOR_TOOL} (the run's own" in result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    episodes = report["settings"]["episodes"]
    assert episodes["tools"] == [CALCULATOR_TOOL] and "the run's own" in episodes["source"]
    assert episodes["tool_timeout"] == 30.0  # RLConfig's default, saved in the run's config.yaml
    assert report["settings"]["reward_funcs"] == ["exact_answer"]  # the run's rewards too
    numbers = report["checkpoints"][str(calculator_run)]
    assert numbers["tool_calls_per_episode"] > 0 and numbers["turns_per_episode"] > 1
    assert 0.0 <= numbers["tool_success_rate"] <= 1.0
    assert numbers["kl_per_sequence"]["mean"] >= 0.0 and numbers["base_perplexity"] > 1.0

    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3
    assert [m["role"] for m in samples[0]["prompt"]] == ["system", "user"]
    responses = [s["responses"][str(calculator_run)] for s in samples]
    roles = [m["role"] for r in responses for m in r["response"]]
    assert "tool" in roles and set(roles) == {"assistant", "tool"}
    assert all({"turns", "tool_calls", "tool_failures", "truncated"} <= set(r) for r in responses)
    called = [m for r in responses for m in r["response"] if m.get("tool_calls")]
    assert called[0]["tool_calls"][0]["function"]["name"] == "calculator"

    markdown = (out / "report.md").read_text()
    assert "tool success ↑" in markdown and "turns/episode" in markdown
    assert f"multi-turn episodes with tools `{CALCULATOR_TOOL}` (the run's own" in markdown


def test_the_trainers_periodic_evaluation_samples_episodes(calculator_run):
    (row,) = read_jsonl(calculator_run / "metrics.jsonl")
    assert row["eval/tools/call_frequency"] > 0 and row["eval/turns_mean"] > 1
    assert "eval/reward_mean" in row and row["eval/tools/failure_frequency"] == 0.0


def test_tools_on_a_model_dir_and_the_same_report_at_every_batch_size(tool_model_dir, run_here, tmp_path):
    from rlhf.evaluate import evaluate

    out = tmp_path / "eval"
    result = run_here("evaluate.py", "--checkpoints", str(tool_model_dir), "--tools", CALCULATOR_TOOL, "--dataset",
                      "builtin:calculator", "--num_prompts", "3", "--num_samples", "2", "--batch_size", "16",
                      "--output_dir", str(out), *EXACT_ANSWER, *SAMPLING)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["episodes"]["source"] == "given"
    numbers = report["checkpoints"][str(tool_model_dir)]
    assert numbers["tool_calls_per_episode"] > 0 and numbers["turns_per_episode"] > 1
    assert numbers["tool_success_rate"] == 1.0  # the fitted model writes valid calls
    assert numbers["kl_per_sequence"]["mean"] == 0.0  # the model dir is the base itself
    # tokens are the sampled ones: fewer than the episodes' (tool results are not the model's)
    assert 0 < numbers["response_length"] <= 96

    settings = dict(dataset="builtin:calculator", reward_funcs=["exact_answer"],
                    reward_kwargs={"exact_answer": {"column": "solution"}}, num_prompts=3, num_samples=2,
                    max_new_tokens=96, max_prompt_length=512, temperature=TOOL_MODEL_TEMPERATURE, seed=1,
                    tools=[f"{ROOT / CALCULATOR_TOOL}"])
    one = evaluate([str(tool_model_dir)], batch_size=1, **settings)
    four = evaluate([str(tool_model_dir)], batch_size=4, **settings)
    assert one["checkpoints"] == four["checkpoints"] == report["checkpoints"]


def test_an_environment_reports_turns_and_pays_its_reward(tool_model_dir, run_here, tmp_path):
    out = tmp_path / "eval"
    # a bare --reward_funcs: the environment's get_reward alone, as a training run may have it
    result = run_here("evaluate.py", "--checkpoints", str(tool_model_dir), "--environment", GUESS_ENVIRONMENT,
                      "--dataset", "builtin:guess", "--reward_funcs", "--num_prompts", "4", "--output_dir", str(out),
                      *SAMPLING, "--max_new_tokens", "256")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["reward_funcs"] == ["NumberGuess.get_reward"]
    assert report["settings"]["episodes"]["environment_factory"] == GUESS_ENVIRONMENT
    numbers = report["checkpoints"][str(tool_model_dir)]
    assert set(numbers["rewards"]) == {"NumberGuess"}
    assert numbers["turns_per_episode"] > 1 and numbers["tool_calls_per_episode"] > 0
    samples = [s["responses"][str(tool_model_dir)] for s in read_jsonl(out / "samples.jsonl")]
    # each wrong guess costs 0.1 on its turn (turn rewards), finding the number pays 1 (get_reward)
    for sample in samples:
        results = [m["content"] for m in sample["response"] if m["role"] == "tool"]
        wrong = sum(r in ("higher", "lower") for r in results)
        assert sample["turn_reward"] == pytest.approx(-0.1 * wrong)
        assert sample["reward"] == pytest.approx(-0.1 * wrong + 1.0 * ("correct" in results), abs=1e-6)
    assert any(s["turn_reward"] < 0 for s in samples)
    assert numbers["turn_reward_mean"] == pytest.approx(sum(s["turn_reward"] for s in samples) / len(samples))


def test_kl_and_base_nll_count_the_sampled_tokens_of_the_whole_episode(tool_model_dir):
    """The base-NLL of an episode is over its sampled tokens, with the tool results between them as
    context: a row cut at mask.sum() (one-turn width) would lose the later turns."""
    from reward_models import CombinedReward
    from rlhf.data import load_prompt_dataset
    from rlhf.episodes import ToolEpisodes
    from rlhf.episodes.runner import sample_episode_rollout
    from rlhf.evaluate import adapter_disabled, sample_and_score, sample_seed
    from rlhf.examples.calculator import calculator
    from rlhf.models import PolicyWithValue, load_base_model, load_tokenizer, stop_token_ids
    from rlhf.rollout import forward_response

    def zero(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    model, tokenizer = load_base_model(str(tool_model_dir)).eval(), load_tokenizer(str(tool_model_dir))
    episodes = ToolEpisodes(tokenizer, tools=[calculator])
    dataset = load_prompt_dataset("builtin:calculator", "eval")
    stops = stop_token_ids(str(tool_model_dir), tokenizer)
    (record,) = sample_and_score(model, tokenizer, dataset, [0], CombinedReward([zero]), base=None, seed=2,
                                 max_new_tokens=96, temperature=TOOL_MODEL_TEMPERATURE, max_prompt_length=512,
                                 eos_token_ids=stops, episodes=episodes)
    rollout = sample_episode_rollout(episodes, model, [dict(dataset[0])], prompt_column="prompt", group_ids=[0],
                                     columns={}, max_completion_length=96, max_prompt_length=512,
                                     temperature=TOOL_MODEL_TEMPERATURE, top_p=1.0, stop_ids=stops,
                                     row_seeds=[sample_seed(2, 0, 0)])
    assert rollout.completions[0] == record["response"] and record["tool_calls"] >= 1
    sampled = int(rollout.mask.sum())
    assert record["tokens"] == sampled < int(rollout.episode_mask.sum())  # tool tokens sit between the turns
    with torch.no_grad():
        logprobs = forward_response(PolicyWithValue(model, None), rollout, slice(None), 1.0)[0]
    assert record["base_nll"] == pytest.approx(float(-(logprobs * rollout.mask).sum()), rel=1e-4)
    assert record["kl"] == 0.0  # the policy is the base

    # Against another model: KL sums over the sampled tokens only (k1 = logp - logq where mask is 1).
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_base_model(str(tool_model_dir)), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    peft_model.eval()
    (other,) = sample_and_score(peft_model, tokenizer, dataset, [0], CombinedReward([zero]),
                                base=lambda: adapter_disabled(peft_model), seed=2, max_new_tokens=96,
                                temperature=TOOL_MODEL_TEMPERATURE, max_prompt_length=512, eos_token_ids=stops,
                                episodes=episodes)
    rollout = sample_episode_rollout(episodes, peft_model, [dict(dataset[0])], prompt_column="prompt",
                                     group_ids=[0], columns={}, max_completion_length=96, max_prompt_length=512,
                                     temperature=TOOL_MODEL_TEMPERATURE, top_p=1.0, stop_ids=stops,
                                     row_seeds=[sample_seed(2, 0, 0)])
    with torch.no_grad():
        policy = forward_response(PolicyWithValue(peft_model, None), rollout, slice(None), TOOL_MODEL_TEMPERATURE)[0]
        with peft_model.disable_adapter():
            base = forward_response(PolicyWithValue(peft_model, None), rollout, slice(None), TOOL_MODEL_TEMPERATURE)[0]
    expected = float(((policy - base) * rollout.mask).sum())
    assert other["kl"] == pytest.approx(expected, rel=1e-3, abs=1e-5) and other["kl"] != 0.0


@pytest.mark.parametrize("flags, fragments", [
    (["--tools", "rlhf/examples/calculator.py:no_such_tool"], ["no_such_tool"]),
    (["--environment", "rlhf/examples/no_such_file.py:Game"], ["environment file not found"]),
    (["--tools", CALCULATOR_TOOL, "--tool_timeout", "0"], ["tool_timeout must be > 0"]),
    (["--tools", CALCULATOR_TOOL, "--max_tool_calling_iterations", "-1"], ["max_tool_calling_iterations must be >= 0"]),
    (["--tools", CALCULATOR_TOOL, "--chat_template", "no_such_template"], ["chat_template 'no_such_template'"]),
])
def test_bad_tool_settings_are_one_line_errors(tool_model_dir, run_here, tmp_path, flags, fragments):
    result = run_here("evaluate.py", "--checkpoints", str(tool_model_dir), "--dataset", "builtin:calculator",
                      "--output_dir", str(tmp_path / "out"), "--num_prompts", "1", *flags)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_runs_tool_that_cannot_be_found_here_says_where_it_came_from(calculator_run, run_here, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "moved_run"
    shutil.copytree(calculator_run / "final", run / "final")
    settings = yaml.safe_load((calculator_run / "config.yaml").read_text())
    settings["tools"] = ["elsewhere/calculator.py:calculator"]  # a path relative to where training ran
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    result = run_here("evaluate.py", "--checkpoints", str(run), "--dataset", "builtin:calculator",
                      "--output_dir", str(tmp_path / "out"), "--num_prompts", "1")
    assert_one_line_error(result, "tool file not found: elsewhere/calculator.py", "the run's own", "pass --tools")


def test_tools_a_run_was_given_in_python_import_again():
    from rlhf.errors import ConfigError
    from rlhf.run_settings import _importable

    assert _importable("python:rlhf.examples.number_guess.NumberGuess", "environment") == \
        "rlhf.examples.number_guess:NumberGuess"
    assert _importable(CALCULATOR_TOOL, "tools") == CALCULATOR_TOOL
    with pytest.raises(ConfigError, match="pass --tools"):
        _importable("python:tests.test_x.test_y.<locals>.calculator", "tools")


def test_tool_prompts_cut_by_max_prompt_length_are_announced(run_here, tool_model_dir, tmp_path):
    """The calculator's schema makes the rendered prompts ~290 tokens; a shorter limit said nothing."""
    result = run_here("evaluate.py", "--checkpoints", str(tool_model_dir), "--dataset", "builtin:calculator",
                      "--tools", "rlhf/examples/calculator.py:calculator", "--reward_funcs", "exact_answer",
                      "--reward_kwargs", '{"exact_answer": {"column": "solution"}}', "--num_prompts", "2",
                      "--max_new_tokens", "8", "--max_prompt_length", "96", "--output_dir", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 of 2 prompts are longer than max_prompt_length 96" in result.stderr
