"""Prompt datasets in every format, the prompt sampler, and the reward loader."""

from __future__ import annotations

import json

import datasets
import pytest

from reward_models import CombinedReward, load_reward_function, sentiment
from rlhf.data import PromptSampler, format_prompt, load_prompt_dataset
from rlhf.errors import DataError, RewardError
from rlhf.models import load_tokenizer


def test_builtin_prompt_set_is_large_and_split():
    train = load_prompt_dataset("builtin:prompts", "train")
    evaluation = load_prompt_dataset("builtin:prompts", "eval")
    assert len(train) + len(evaluation) >= 200
    assert not set(train["prompt"]) & set(evaluation["prompt"])


def write_table(table: datasets.Dataset, path) -> None:
    if path.suffix == ".jsonl":
        table.to_json(path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(table.to_list()))
    elif path.suffix == ".csv":
        table.to_csv(path)
    elif path.suffix == ".parquet":
        table.to_parquet(path)
    else:
        table.save_to_disk(path)


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.csv", "data.parquet", "saved_dir"])
def test_every_file_format(name, tmp_path):
    table = datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]})
    path = tmp_path / name
    write_table(table, path)
    loaded = load_prompt_dataset(str(path))
    assert list(loaded["prompt"]) == ["a", "b"] and "answer" in loaded.column_names


def test_chat_message_prompts_use_the_template(tiny_model_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]}) + "\n")
    row = load_prompt_dataset(str(path))[0]["prompt"]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = format_prompt(row, tokenizer)
    assert "<|im_start|>system\nBe kind." in text and text.endswith("<|im_start|>assistant\n")
    assert format_prompt("Hi", tokenizer).endswith("Hi<|im_end|>\n<|im_start|>assistant\n")


def test_bad_datasets(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"))
    bad_type = tmp_path / "data.txt"
    bad_type.write_text("hello")
    with pytest.raises(DataError, match="unsupported"):
        load_prompt_dataset(str(bad_type))
    with pytest.raises(DataError, match="unknown built-in"):
        load_prompt_dataset("builtin:nothing")


def test_sampler_covers_epochs_and_resumes_exactly():
    sampler = PromptSampler(dataset_size=5, batch_size=3, seed=7)
    first = [sampler.next_batch() for _ in range(2)]
    assert sorted(first[0] + first[1][:2]) == [0, 1, 2, 3, 4]  # epoch 0 is a permutation
    state = sampler.state_dict()
    later = [sampler.next_batch() for _ in range(3)]
    resumed = PromptSampler(5, 3, 7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(3)] == later


def test_sentiment_reward_range_and_order():
    scores = sentiment([], ["I love this, it is wonderful!", "This is terrible and I hate it.", "The box is on the table."])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0


def test_combined_reward_weights_and_components(tmp_path):
    module = tmp_path / "r.py"
    module.write_text("def ones(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    combined = CombinedReward(["sentiment", f"{module}:ones"], [2.0, 0.5])
    output = combined(["p"], ["I love it"])
    assert output.components["ones"] == [1.0]
    assert output.total[0] == pytest.approx(2.0 * output.components["sentiment"][0] + 0.5)
    assert load_reward_function("reward_models.builtins:sentiment") is sentiment
    assert load_reward_function("sentiment") is sentiment
    with pytest.raises(RewardError, match="returned 'x' for sample 0"):
        CombinedReward._check("f", ["x"], ["c"])
