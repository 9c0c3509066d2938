"""A TRL user's job: TRL's own reward functions and calling conventions, Python callables and
Dataset objects through a GRPOTrainer-shaped API, hub / local datasets, None as "not applicable"."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import warnings

import datasets
import pytest
import torch
import yaml
from conftest import FIXTURES, tiny_args

from reward_models import CombinedReward
from rlhf.config import RLConfig

CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"What is {i} + {i}?"}],
     "solution": str(2 * i)}
    for i in range(8)
]


def grpo_config(model_dir, out, **overrides):
    return RLConfig(**{
        "model_name_or_path": str(model_dir), "output_dir": str(out), "max_steps": 2, "rollout_batch_size": 2,
        "num_generations": 4, "mini_batch_size": 8, "max_new_tokens": 8, "max_prompt_length": 64, "lora_r": 4,
        "lora_alpha": 8, "advantage_estimator": "grpo", "kl_in_reward": False, "kl_estimator": "k3",
        "whiten_advantages": False, "num_samples_to_log": 2, **overrides,
    })


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ TRL's reward functions, as TRL calls them


def test_trl_reward_functions_score_conversational_batches_as_in_trl():
    """TRL's own functions (not copies): message-list completions, completion_ids, dataset columns.
    Before: think_format_reward raised TypeError (completions were strings) and the overlong
    punishment KeyError/TypeError (no completion_ids)."""
    from trl.rewards import accuracy_reward, get_repetition_penalty_reward, get_soft_overlong_punishment
    from trl.rewards import think_format_reward

    overlong = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    reward = CombinedReward([accuracy_reward, think_format_reward, overlong, repetition])
    prompts = [CHAT_ROWS[0]["prompt"]] * 3
    completions = ["<think>\nhalf of it\n</think>\nThe answer is \\boxed{\\frac{1}{2}}.", "\\boxed{2}", "a a a a a a"]
    output = reward(prompts, completions, completion_ids=[[1] * 4, [1] * 8, [1] * 10],
                    solution=["\\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}"])
    assert output.components["accuracy_reward"] == [1.0, 0.0, 0.0]
    assert output.components["think_format_reward"] == [1.0, 0.0, 0.0]
    assert output.components["soft_overlong_punishment_reward"] == [0.0, -0.5, -1.0]  # lengths 4, 8, 10 of 10
    as_trl = [[{"role": "assistant", "content": c}] for c in completions]  # what TRL itself would pass
    assert output.components["repetition_penalty_reward"] == repetition(completions=as_trl,
                                                                         completion_ids=[[1] * 4, [1] * 8, [1] * 10])
    assert output.components["repetition_penalty_reward"][2] < 0  # ids [1] * 10: all repeats
    assert output.total[0] == pytest.approx(sum(values[0] for values in output.components.values()))


def test_a_trl_style_job_trains_through_the_python_api(tiny_model_dir, tmp_path):
    """RLTrainer(model=..., reward_funcs=[TRL's functions, a callable], args=..., train_dataset=Dataset)."""
    from trl.rewards import accuracy_reward, get_soft_overlong_punishment, think_format_reward

    from rlhf.trainer import RLTrainer

    seen = {}

    def spy(prompts, completions, completion_ids, solution, trainer_state, **kwargs):
        seen.update(prompt=prompts[0], completion=completions[0], ids=completion_ids[0], solution=solution,
                    step=trainer_state.global_step, keywords=sorted(kwargs))
        return [0.0] * len(completions)

    out = tmp_path / "run"
    trainer = RLTrainer(model=str(tiny_model_dir), args=grpo_config(tiny_model_dir, out),
                        reward_funcs=[accuracy_reward, think_format_reward,
                                      get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4), spy],
                        train_dataset=datasets.Dataset.from_list(CHAT_ROWS))
    trainer.train()
    # roles kept (before: "You are terse.\nWhat is 0 + 0?"), the completion as TRL's assistant message
    assert seen["prompt"][0] == {"role": "system", "content": "You are terse."}
    assert seen["completion"][0]["role"] == "assistant" and isinstance(seen["completion"][0]["content"], str)
    text = trainer.tokenizer.decode(seen["ids"], skip_special_tokens=True)
    assert text == seen["completion"][0]["content"] and 1 <= len(seen["ids"]) <= 8
    assert len(seen["solution"]) == 8 and seen["step"] == 1 and "log_metric" in seen["keywords"]
    rows = metrics_rows(out)
    assert len(rows) == 2
    for row in rows:
        assert row["rewards/accuracy_reward/mean"] in (0.0, pytest.approx(row["rewards/accuracy_reward/mean"]))
        assert -1.0 <= row["rewards/soft_overlong_punishment_reward/mean"] <= 0.0
        assert math.isfinite(row["reward_mean"]) and row["reward_unscorable"] == 0
    saved = trainer.save_model(tmp_path / "adapter")
    assert (saved / "adapter_config.json").is_file() and (saved / "tokenizer_config.json").is_file()
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["reward_funcs"][0] == "python:trl.rewards.accuracy_rewards.accuracy_reward"
    assert recorded["dataset"] == "<Dataset 8 rows>"


def test_plain_text_prompts_give_strings(tiny_model_dir, tmp_path):
    from rlhf.trainer import RLTrainer

    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompt=prompts[0], completion=completions[0])
        return [1.0] * len(completions)

    rows = [{"prompt": f"Tell me about item {i}."} for i in range(4)]
    RLTrainer(grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1), reward_funcs=[spy],
              train_dataset=datasets.Dataset.from_list(rows)).train()
    assert isinstance(seen["prompt"], str) and seen["prompt"].startswith("Tell me about item")
    assert isinstance(seen["completion"], str)


def test_model_and_tokenizer_objects_through_the_api(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.trainer import RLTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = RLTrainer(model, reward_funcs=lambda prompts, completions, **kw: [float(len(c)) for c in completions],
                        args=grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1,
                                         model_name_or_path="smollm2-135m-instruct"),
                        train_dataset=datasets.Dataset.from_list(CHAT_ROWS), processing_class=tokenizer)
    assert trainer.config.model_name_or_path == str(tiny_model_dir)  # the object's name_or_path is recorded
    assert trainer.tokenizer is tokenizer and trainer.tokenizer.padding_side == "left"
    trainer.train()
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ Python callables


class LengthScorer:
    def __call__(self, prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]


class AsyncJudge:
    async def __call__(self, prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [0.5 for _ in completions]


def scaled(prompts, completions, scale=1.0, **kwargs):
    return [scale for _ in completions]


def test_callables_objects_async_objects_and_partials():
    """Before: AttributeError: ... has no attribute 'startswith'."""
    reward = CombinedReward([LengthScorer(), AsyncJudge(), functools.partial(scaled, scale=3.0), scaled],
                            kwargs={"scaled_3": {"scale": 2.0}})
    assert reward.names == ["LengthScorer", "AsyncJudge", "scaled", "scaled_3"]
    output = reward(["p", "q"], ["ab", "abcd"])
    assert output.components == {"LengthScorer": [2.0, 4.0], "AsyncJudge": [0.5, 0.5], "scaled": [3.0, 3.0],
                                 "scaled_3": [2.0, 2.0]}


def test_rlconfig_takes_callables_and_records_their_names(tmp_path):
    from rlhf.config import save_config

    config = RLConfig(reward_funcs=[scaled, "sentiment"], dataset=datasets.Dataset.from_list(CHAT_ROWS))
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["reward_funcs"] == ["python:test_trl_compat.scaled", "sentiment"]
    assert saved["dataset"] == "<Dataset 8 rows>"
    with pytest.raises(Exception, match="reward_funcs entries are names, paths, URLs or Python callables, got int"):
        RLConfig(reward_funcs=[3])


# ------------------------------------------------------------------ None = not applicable


def test_none_is_left_out_of_sums_and_means():
    """TRL's NaN handling. Before: 'returned None for sample 0' stopped the run."""
    def only_even(prompts, completions, **kwargs):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    def only_first(prompts, completions, **kwargs):
        return [2.0] + [None] * (len(completions) - 1)

    output = CombinedReward([only_even, only_first], weights=[1.0, 0.5])(["p"] * 4, ["a", "b", "c", "d"])
    assert output.total == [2.0, 0.0, 1.0, 0.0]
    assert output.unscorable == [False, True, False, True]
    assert output.components["only_even"][0] == 1.0 and math.isnan(output.components["only_even"][1])
    assert output.per_sample(["a", "b", "c", "d"]) == [2.0, None, 1.0, None]


def test_unscorable_samples_warn_and_leave_the_update(tmp_path):
    from rlhf.scoring import fill_unscorable, score
    from test_scoring import OneProcess, text_rollout

    class Reducer(OneProcess):
        def gather(self, tensor):
            return tensor

        def mean(self, value):
            return float(torch.as_tensor(value).float().mean())

    def judge(prompts, completions, **kwargs):
        return [None if "skip" in c else float(len(c)) for c in completions]

    rollout = text_rollout(["abcd", "skip me", "ab", "abc"])
    rollout.group_ids = torch.tensor([0, 0, 1, 1])
    with pytest.warns(UserWarning, match="every reward function returned None .* for 1 samples"):
        scores, _, metrics = score(CombinedReward([judge]), rollout, RLConfig(), Reducer(), step=1)
    assert metrics["reward_unscorable"] == 1 and metrics["reward_mean"] == pytest.approx(3.0)  # mean of 4, 2, 3
    assert math.isnan(scores[1])
    filled, scorable = fill_unscorable(scores, rollout.group_ids)
    assert filled.tolist() == [4.0, 4.0, 2.0, 3.0]  # its group's mean: the group's baseline is unchanged
    assert scorable.tolist() == [True, False, True, True]
    all_missing, _ = fill_unscorable(torch.tensor([math.nan, math.nan, 1.0]), torch.tensor([0, 0, 1]))
    assert all_missing.tolist() == [0.0, 0.0, 1.0]


def test_a_step_where_no_reward_applies_says_so(tiny_model_dir, tmp_path):
    """A reviewer's: every reward None gave 'every response was left out of the loss (all groups
    without reward spread dropped, or all cut off ...)', naming neither cause it had."""
    import warnings

    from rlhf.trainer import RLTrainer

    def never_applies(completions, **kwargs):
        return [None] * len(completions)

    trainer = RLTrainer(model=str(tiny_model_dir), reward_funcs=[never_applies],
                        train_dataset=datasets.Dataset.from_list(CHAT_ROWS),
                        args=grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1))
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        trainer.train()
    empty = [str(w.message) for w in heard if "left out of the loss" in str(w.message)]
    assert len(empty) == 1 and "every reward function returned None for them" in empty[0], empty


def test_a_run_with_unscorable_samples_masks_them_out(tiny_model_dir, tmp_path, monkeypatch):
    import rlhf.experience as experience
    from rlhf.trainer import RLTrainer

    masks = []
    original = experience.make_experience

    def recording(*args, **kwargs):
        batch, metrics = original(*args, **kwargs)
        masks.append((args[2].clone(), batch.loss_mask.clone()))
        return batch, metrics

    monkeypatch.setattr("rlhf.trainer.make_experience", recording)

    def half_applicable(prompts, completions, **kwargs):
        return [None if i < 4 else float(len(c)) for i, c in enumerate(completions)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RLTrainer(grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1), reward_funcs=[half_applicable],
                  train_dataset=datasets.Dataset.from_list(CHAT_ROWS)).train()
    assert any("returned None (not applicable) for 4 samples" in str(w.message) for w in caught)
    scores, loss_mask = masks[0]
    assert torch.isnan(scores[:4]).all() and not torch.isnan(scores[4:]).any()
    assert loss_mask[:4].sum() == 0 and loss_mask[4:].sum() > 0
    row = metrics_rows(tmp_path / "run")[0]
    assert row["reward_unscorable"] == 4 and math.isfinite(row["policy_loss"])


# ------------------------------------------------------------------ datasets


def test_dataset_dir_of_split_files_and_its_test_split_for_evaluation(tiny_model_dir, tmp_path, run_here):
    """A dir of train/test files (datasets' folder loader), TRL's names for the splits."""
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", CHAT_ROWS[:6]), ("test", CHAT_ROWS[6:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from rlhf.data import load_eval_dataset, load_prompt_dataset

    assert len(load_prompt_dataset(str(data), "train")) == 6
    config = RLConfig(dataset=str(data))
    assert len(load_eval_dataset(config)) == 2  # the dataset's own test split
    with pytest.raises(Exception, match="has splits train, test, not 'validation'"):
        load_prompt_dataset(str(data), "validation")
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--dataset", str(data),
                                                       "--eval_steps", "2", "--eval_num_prompts", "2",
                                                       "--reward_funcs", "length"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval/reward_mean" in metrics_rows(tmp_path / "out")[-1]


def test_hub_dataset_ids_go_to_load_dataset_with_config_and_split(monkeypatch):
    """The hub code path up to its boundary: name, config and split reach datasets.load_dataset."""
    from rlhf import data

    calls = []

    def fake_load_dataset(name, config_name=None, split=None, **kwargs):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list([{"prompt": "hello"}])

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    loaded = data.load_prompt_dataset("trl-lib/tldr", "validation", config_name="default")
    assert calls == [("trl-lib/tldr", "default", "validation")] and loaded[0]["prompt"] == "hello"
    config = RLConfig(dataset="openai/gsm8k", dataset_config="main", eval_dataset_split="test")
    data.load_eval_dataset(config)
    assert calls[-1] == ("openai/gsm8k", "main", "test")

    def not_found(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(data.datasets, "load_dataset", not_found)
    with pytest.raises(Exception, match="neither a local file or dir nor a dataset on the Hugging Face hub"):
        data.load_prompt_dataset("org/nothing")


def test_offline_hub_dataset_is_one_line(tiny_model_dir, tmp_path):
    """Before: 'dataset not found: trl-lib/tldr' (no hub code path at all)."""
    from conftest import run_script

    result = run_script("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--dataset", "trl-lib/tldr"),
                        env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trl-lib/tldr" in lines[0] and "hub cannot be reached" in lines[0], result.stderr
    assert not any((tmp_path / "out").rglob("*.*"))  # nothing written


def test_builtin_math_set_is_trl_conversational_with_a_solution_column():
    from rlhf.data import load_prompt_dataset

    train = load_prompt_dataset("builtin:math")
    assert train.column_names == ["prompt", "solution"] and len(train) == 200
    assert [m["role"] for m in train[0]["prompt"]] == ["system", "user"]
    assert len(load_prompt_dataset("builtin:math", "eval")) == 40


def test_streaming_datasets_are_refused_in_one_line():
    from rlhf.data import load_prompt_dataset

    stream = datasets.Dataset.from_list(CHAT_ROWS).to_iterable_dataset()
    with pytest.raises(Exception, match="streaming .* not supported"):
        load_prompt_dataset(stream)


def test_fixture_reward_file_still_loads():  # the reward entry every tiny run uses
    assert (FIXTURES / "rewards.py").is_file()


def test_readme_python_api_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    """The README's API block itself, on the tiny model, one short step, in the repository root."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- api-example"):]
    code = block[block.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    assert len(code.strip().splitlines()) <= 20
    for old, new in (('"smollm2-135m-instruct"', repr(str(tiny_model_dir))), ('"outputs/api', f'"{tmp_path}/api'),
                     ("max_steps=10", "max_steps=1"), ("max_new_tokens=64", "max_new_tokens=8")):
        assert old in code
        code = code.replace(old, new)
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "api" / "adapter" / "adapter_model.safetensors").is_file()
    row = metrics_rows(tmp_path / "api")[0]
    assert {"rewards/accuracy_reward/mean", "rewards/think_format_reward/mean", "rewards/brevity/mean"} <= set(row)


def test_rlconfig_from_dict_reads_trl_names_and_keeps_python_values():
    config = RLConfig.from_dict({"max_completion_length": 24, "num_iterations": 2, "beta": 0.0, "loss_type": "dapo",
                                 "epsilon_high": 0.28, "reward_funcs": [scaled], "dataset_name": "org/data",
                                 "dataset_test_split": "validation"})
    assert (config.max_new_tokens, config.ppo_epochs, config.kl_coef, config.loss_agg_mode) == (24, 2, 0.0, "token-mean")
    assert config.clip_range_high == 0.28 and config.reward_funcs == [scaled]
    assert (config.dataset, config.eval_dataset_split) == ("org/data", "validation")
    with pytest.raises(Exception, match="per_device_train_batch_size .* global"):
        RLConfig.from_dict({"per_device_train_batch_size": 4})
    with pytest.raises(Exception, match="both set max_new_tokens"):
        RLConfig.from_dict({"max_completion_length": 24, "max_new_tokens": 16})


def test_reward_weights_as_an_array_a_tuple_or_a_tensor_are_a_list_of_numbers():
    """TRL's trainer reads reward_weights through torch.tensor, so an array of weights works there.
    Before: a numpy array or a tensor of weights was a ValueError traceback (an array's truth value),
    numpy's float32 weights were refused as not numbers."""
    import numpy as np

    from rlhf.errors import ConfigError

    two = ["sentiment", "length"]
    for weights in (np.array([1.0, 0.5]), (1.0, 0.5), torch.tensor([1.0, 0.5]), [np.float32(1.0), np.float64(0.5)]):
        config = RLConfig.from_dict({"reward_funcs": two, "reward_weights": weights})
        assert config.reward_weights == [1.0, 0.5] and all(type(w) is float for w in config.reward_weights)
        assert RLConfig(reward_funcs=two, reward_weights=weights).reward_weights == [1.0, 0.5]
    for weights in (np.ones((2, 2)), torch.ones(2, 2), np.array(2.0), 2.0, "1,2"):
        with pytest.raises(ConfigError, match="reward_weights expects a list of numbers") as refused:
            RLConfig.from_dict({"reward_funcs": two, "reward_weights": weights})
        assert "\n" not in str(refused.value)  # one line, also for an array (a reviewer: its repr ran over two)


# ------------------------------------------------------------------ found by trying it as a stranger


def test_training_and_periodic_evaluation_pass_what_trl_passes(tiny_model_dir, tmp_path):
    """A TRL function that needs trainer_state and log_extra (no defaults). Before: evaluation
    called it without trainer_state (TypeError at the first eval), training without log_extra."""
    from rlhf.trainer import RLTrainer

    steps = []

    def curriculum(completions, trainer_state, log_extra, log_metric, **kwargs):
        steps.append(trainer_state.global_step)
        log_extra("length", [len(c[0]["content"]) for c in completions])
        log_metric("curriculum/calls", 1.0)
        return [trainer_state.global_step / trainer_state.max_steps] * len(completions)

    out = tmp_path / "run"
    dataset = datasets.Dataset.from_list(CHAT_ROWS)
    RLTrainer(model=str(tiny_model_dir), reward_funcs=[curriculum], train_dataset=dataset, eval_dataset=dataset,
              args=grpo_config(tiny_model_dir, out, eval_steps=1, eval_num_prompts=2)).train()
    assert steps[:2] == [0, 1]  # training step 1 sees 0 completed steps; its evaluation after it sees 1
    rows = metrics_rows(out)
    assert rows[0]["curriculum/calls"] == 1.0 and "eval/reward_mean" in rows[0]
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["length"] == len(sample["completion"])


@pytest.mark.parametrize("name", ["reward_mean", "policy_loss", "kl", "step", "eval/reward_mean", "reward_clip_frac"])
def test_a_reward_functions_metric_cannot_replace_the_trainers(name, tiny_model_dir, tmp_path):
    """A reviewer's: log_metric("reward_mean", 123.0) logged reward_mean 123.0 (the rewards' mean
    was 1.5), and under the trainer's later names (policy_loss) the user's value was dropped."""
    from rlhf.errors import RewardError
    from rlhf.trainer import RLTrainer

    def clashing(completions, log_metric, **kwargs):
        log_metric(name, 123.0)
        return [float(i % 4) for i in range(len(completions))]

    def own_name(completions, log_metric, **kwargs):
        log_metric("reward_fn/calls", 1.0)
        return [float(i % 4) for i in range(len(completions))]

    dataset = datasets.Dataset.from_list(CHAT_ROWS)
    trainer = RLTrainer(model=str(tiny_model_dir), reward_funcs=[clashing], train_dataset=dataset,
                        args=grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1, reward_clip=10.0))
    with pytest.raises(RewardError, match=f"logged '{name}' with log_metric, a metric the trainer logs itself"):
        trainer.train()
    RLTrainer(model=str(tiny_model_dir), reward_funcs=[own_name], train_dataset=dataset,
              args=grpo_config(tiny_model_dir, tmp_path / "own", max_steps=1)).train()
    row = metrics_rows(tmp_path / "own")[0]
    assert row["reward_fn/calls"] == 1.0 and row["reward_mean"] == 1.5


def test_the_trainer_takes_grpo_trainers_arguments_in_its_order(tiny_model_dir, tmp_path):
    """A reviewer's: RLTrainer(model, reward_fn, args, dataset) as GRPOTrainer is called was a
    TypeError (keyword-only), as were reward_processing_classes, callbacks, optimizers, rollout_func."""
    from rlhf.errors import ConfigError
    from rlhf.trainer import RLTrainer

    dataset = datasets.Dataset.from_list(CHAT_ROWS)
    trainer = RLTrainer(str(tiny_model_dir), [scaled], grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1),
                        dataset)
    assert trainer.config.dataset is dataset and trainer.reward.weights == [1.0]
    trainer.train()
    assert metrics_rows(tmp_path / "run")[0]["step"] == 1
    for name, value in (("callbacks", [object()]), ("optimizers", (object(), None)), ("rollout_func", print),
                        ("reward_processing_classes", [object()]), ("quantization_config", object())):
        with pytest.raises(ConfigError, match=f"^{name} \\(GRPOTrainer's argument\\) has no counterpart here"):
            RLTrainer(str(tiny_model_dir), [scaled], grpo_config(tiny_model_dir, tmp_path / name), dataset,
                      **{name: value})
    with pytest.raises(ConfigError, match="^optimizers \\(GRPOTrainer's argument\\)"):  # not a pair: was a TypeError
        RLTrainer(str(tiny_model_dir), [scaled], grpo_config(tiny_model_dir, tmp_path / "sgd"), dataset,
                  optimizers=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    RLTrainer(str(tiny_model_dir), [scaled], grpo_config(tiny_model_dir, tmp_path / "defaults"), dataset,
              callbacks=[], optimizers=(None, None), reward_processing_classes=[])  # no request


def test_reward_weights_in_the_config_go_with_the_trainers_functions(tiny_model_dir, tmp_path):
    """TRL's pattern: GRPOConfig(reward_weights=...) + GRPOTrainer(reward_funcs=[a, b]). Before:
    'reward_weights has 2 values but reward_funcs has 1' when the config was built."""
    from rlhf.errors import ConfigError
    from rlhf.trainer import RLTrainer

    config = grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1, reward_weights=[0.5, 2.0])
    trainer = RLTrainer(model=str(tiny_model_dir), reward_funcs=[scaled, functools.partial(scaled, scale=0.25)],
                        args=config, train_dataset=datasets.Dataset.from_list(CHAT_ROWS))
    assert trainer.reward.weights == [0.5, 2.0]
    with pytest.raises(ConfigError, match="reward_weights has 2 values but reward_funcs has 3"):
        RLTrainer(model=str(tiny_model_dir), reward_funcs=[scaled, scaled, scaled], args=config)
    with pytest.raises(ConfigError, match="reward_weights must be finite numbers .*, got None"):
        RLConfig(reward_funcs=["sentiment", "length"], reward_weights=[None, 1.0])


def test_return_values_as_trl_takes_them():
    """bool, numpy and torch values count as numbers; strings are refused (TRL's torch.tensor
    refuses them too); a signature that cannot take the reward arguments says so."""
    import numpy as np

    from rlhf.errors import RewardError

    def mixed(completions, **kwargs):
        return [True, np.float32(0.5), torch.tensor(0.25), None]

    assert CombinedReward([mixed])(["p"] * 4, ["a"] * 4).components["mixed"][:3] == [1.0, 0.5, 0.25]
    # a column of values, numpy's as torch's (a reviewer: np.array [N, 1] was refused, a tensor taken)
    for column in (np.array([[1.0], [2.0]]), torch.tensor([[1.0], [2.0]])):
        assert CombinedReward([lambda completions, **kw: column])(["p"] * 2, ["a"] * 2).combined() == [1.0, 2.0]
    with pytest.raises(RewardError, match="for sample 0"):
        CombinedReward([lambda completions, **kw: np.ones((2, 2))])(["p"] * 2, ["a"] * 2)
    # a reviewer's: a column of text was read as numbers; a column of objects may say None (not applicable)
    with pytest.raises(RewardError, match="for sample 0"):
        CombinedReward([lambda completions, **kw: np.array([["1.5"], ["2"]])])(["p"] * 2, ["a"] * 2)
    objects = np.array([[None], [2.0]], dtype=object)
    assert CombinedReward([lambda completions, **kw: objects])(["p"] * 2, ["a"] * 2).combined()[1] == 2.0
    with pytest.raises(RewardError, match="returned '0.5' for sample 0"):
        CombinedReward([lambda completions, **kw: ["0.5"] * len(completions)])(["p"], ["a"])

    def strict(prompts, completions):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="strict' cannot take the arguments .* add \\*\\*kwargs"):
        CombinedReward([strict])(["p"], ["a"], answer=["x"])


def test_async_rewards_inside_a_running_event_loop():
    """Jupyter and async apps run a loop already. Before: asyncio.run() cannot be called from a
    running event loop."""
    async def main():
        return CombinedReward([AsyncJudge()])(["p", "q"], ["a", "b"])

    assert asyncio.run(main()).components["AsyncJudge"] == [0.5, 0.5]


def test_a_loaded_reward_model_object_scores_like_its_dir(tiny_reward_backbone):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_backbone)
    by_object = CombinedReward([model])(["Say hi."] * 2, ["hello there", "go away"])
    by_dir = CombinedReward([str(tiny_reward_backbone)])(["Say hi."] * 2, ["hello there", "go away"])
    name = tiny_reward_backbone.name
    assert by_object.components[name] == pytest.approx(by_dir.components[name])


def test_prompts_of_both_forms_in_one_column_are_refused(tmp_path):
    from rlhf.data import load_prompt_dataset
    from rlhf.errors import DataError

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "plain"}) + "\n" + json.dumps({"prompt": CHAT_ROWS[0]["prompt"]}) + "\n")
    with pytest.raises(DataError, match="row 0's 'prompt' is a string but row 1's is chat messages"):
        load_prompt_dataset(str(mixed))


def test_a_final_assistant_message_is_continued():
    """A prefill: the response continues it (TRL's continue_final_message). Before: the template
    closed it and opened a new assistant turn."""
    from transformers import AutoTokenizer

    from rlhf.data import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    text = format_prompt([{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": "Hello! How"}],
                         tokenizer)
    assert text.endswith("Hello! How"), text
    assert format_prompt([{"role": "user", "content": "Greet me."}], tokenizer).endswith("assistant\n")


def test_report_json_has_null_not_nan(tmp_path):
    from rlhf.report import json_safe

    assert json.loads(json.dumps(json_safe({"a": [math.nan, 1.0], "b": {"c": math.nan}}))) == {
        "a": [None, 1.0], "b": {"c": None}}


def test_trls_peft_config_and_resume_from_checkpoint_through_the_python_api(tiny_model_dir, tmp_path):
    """A stranger's review: RLTrainer refused TRL's peft_config keyword, train() took no
    resume_from_checkpoint, and resume_from_checkpoint: true (TRL's "latest") was read as a
    checkpoint dir named True."""
    import dataclasses

    from peft import LoraConfig

    from rlhf import RLConfig
    from rlhf.errors import ConfigError
    from rlhf.trainer import RLTrainer

    out = tmp_path / "run"
    config = dataclasses.replace(grpo_config(tiny_model_dir, out), save_steps=1, max_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = RLTrainer(model=str(tiny_model_dir), args=config, peft_config=lora,
                        reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
                        train_dataset=datasets.Dataset.from_list(CHAT_ROWS))
    trainer.train()
    saved = json.loads((out / "final" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) == (4, 8, ["q_proj", "v_proj"])

    longer = dataclasses.replace(config, max_steps=2)
    again = RLTrainer(model=str(tiny_model_dir), args=longer, peft_config=lora,
                      reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
                      train_dataset=datasets.Dataset.from_list(CHAT_ROWS))
    with pytest.raises(ConfigError, match="already holds a run"):
        again.train()  # neither resumed nor overwritten: refused before anything is written
    again.train(resume_from_checkpoint=True)
    assert [row["step"] for row in metrics_rows(out)] == [1, 2]

    assert RLConfig(resume_from_checkpoint=True).resume_from_checkpoint == "latest"
    assert RLConfig.from_dict({"resume_from_checkpoint": "true"}).resume_from_checkpoint == "latest"
    for refused, fragment in ((LoraConfig(use_dora=True, target_modules=["q_proj"]), "use_dora=True"),
                              (LoraConfig(target_modules="all-linear", exclude_modules=["q_proj"]), "exclude_modules"),
                              (LoraConfig(), "target_modules is None"), ("lora", "must be a peft LoraConfig")):
        with pytest.raises(ConfigError, match=fragment):
            RLTrainer(model=str(tiny_model_dir), args=config, peft_config=refused)


def test_an_args_built_trainer_never_writes_into_another_run_unawares(tiny_model_dir, tmp_path):
    """Review of 7843dcb: with the other-run check moved to train(), save_model() before train()
    replaced another run's final/ adapter. A start refused in train() left the dirs it made."""
    import dataclasses

    from rlhf.errors import CheckpointError, ConfigError
    from rlhf.trainer import RLTrainer

    out = tmp_path / "run"
    config = dataclasses.replace(grpo_config(tiny_model_dir, out), max_steps=1, save_steps=1)
    reward = [lambda completions, **kw: [1.0] * len(completions)]
    rows = datasets.Dataset.from_list(CHAT_ROWS)
    RLTrainer(model=str(tiny_model_dir), args=config, reward_funcs=reward, train_dataset=rows).train()
    assert (out / "checkpoints" / "step-1" / "tokenizer_config.json").is_file()  # as final/ has it
    final = (out / "final" / "adapter_model.safetensors").read_bytes()
    other = RLTrainer(model=str(tiny_model_dir), args=config, reward_funcs=reward, train_dataset=rows)
    with pytest.raises(ConfigError, match="already holds a run"):
        other.save_model()
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == final
    other.save_model(tmp_path / "elsewhere")  # outside the run: as TRL saves anywhere
    assert (tmp_path / "elsewhere" / "adapter_model.safetensors").is_file()

    fresh = tmp_path / "new" / "nested" / "run"
    refused = RLTrainer(model=str(tiny_model_dir), args=dataclasses.replace(config, output_dir=str(fresh)),
                        reward_funcs=reward, train_dataset=rows)
    with pytest.raises(CheckpointError):
        refused.train(resume_from_checkpoint=str(tmp_path / "nope"))
    assert not (tmp_path / "new").exists()


def test_the_reward_names_trls_grpo_script_reads():
    """TRL's `trl grpo` script reads reward_funcs as its own names (accuracy_reward, ...) or a
    dotted import path; a recipe written for it was refused here ("unknown reward")."""
    from reward_models import CombinedReward
    from reward_models.loader import load_reward_function
    from trl.rewards import think_format_reward

    assert load_reward_function("think_format_reward") is think_format_reward
    assert load_reward_function("trl.rewards.think_format_reward") is think_format_reward
    overlong = load_reward_function("get_soft_overlong_punishment")  # TRL's script: max_completion_len 1280
    assert overlong(completion_ids=[[0] * 1000]) == [0.0] and overlong(completion_ids=[[0] * 1152]) == [-0.5]
    chat = [[{"role": "user", "content": "Hi"}]]
    assert list(CombinedReward(["think_format_reward"])(chat, ["<think>\nok\n</think>\nyes"]).combined()) == [1.0]
