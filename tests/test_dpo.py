"""DPO through TRL on the tiny model, and RL starting from the DPO adapter.

train_dpo.py runs once in a subprocess (dpo_run, shared by the tests that read its outputs); the
other runs and the bad-input cases call the scripts in this process (run_here)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, assert_one_line_error, run_script, tiny_args
from test_train_e2e import lora_b_norm, read_metrics


def write_pairs(path, count):
    rows = [{"prompt": f"Say something about topic {i}.", "chosen": f"Gladly! Topic {i} is lovely and fun.",
             "rejected": "No."} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dpo_args(model_dir, out, tmp_path, *extra):
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--dataset", str(write_pairs(tmp_path / "train.jsonl", 8)),
            "--eval_dataset", str(write_pairs(tmp_path / "eval.jsonl", 4)),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "48",
            "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", "1", *extra]


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dpo")
    out = tmp_path / "dpo"
    result = run_script("train_dpo.py", "--config", str(ROOT / "configs" / "dpo.yaml"),
                        *dpo_args(tiny_model_dir, out, tmp_path, "--beta", "0.2", "--loss_type", "ipo"))
    return result, out


def test_dpo_two_steps_saves_adapter_and_reports_accuracy(dpo_run):
    result, out = dpo_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "beta: 0.2" in (out / "config.yaml").read_text() and "loss_type: ipo" in (out / "config.yaml").read_text()
    rows = read_metrics(out)
    final = rows[-1]
    assert final["train_steps"] == 2
    # Before training the policy is the reference: every implicit margin is exactly 0.
    assert final["eval_accuracy_before"] == 0.0 and final["eval_margin_before"] == 0.0
    assert 0.0 <= final["eval_accuracy_after"] <= 1.0 and final["eval_margin_after"] != 0.0
    assert [r["step"] for r in rows[:-1]] == [1, 2]
    assert lora_b_norm(out / "final") > 0


def test_dpo_adapter_loads_with_peft(dpo_run, tiny_model_dir):
    _, out = dpo_run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "final"))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_rl_starts_from_the_dpo_adapter(dpo_run, tiny_model_dir, tmp_path, run_here):
    _, out = dpo_run
    rl_out = tmp_path / "rl"
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, rl_out, "--max_steps", "1",
                                                       "--init_adapter", str(out / "final")))
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_metrics(rl_out)[0]
    # The merged DPO model is the reference: at the first rollout policy == reference.
    assert row["kl"] == pytest.approx(0.0, abs=1e-4)
    assert f"init_adapter: {out / 'final'}" in (rl_out / "config.yaml").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "nope"], "loss_type 'nope' is not one of: sigmoid, hinge, ipo"),
    (["--beta", "0"], "beta must be > 0"),
    (["--dataset", "missing.jsonl"], "missing.jsonl"),
    # a reviewer's: nan passed every check and trained
    (["--beta", "nan"], "beta must be a finite number, got nan"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--max_grad_norm", "1e400"], "max_grad_norm must be a finite number, got inf"),
])
def test_dpo_bad_input_exits_2(flags, message, tmp_path, run_here):
    result = run_here("train_dpo.py", "--output_dir", str(tmp_path / "out"), *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_dpo_refuses_to_overwrite_a_run(dpo_run, tiny_model_dir, tmp_path, run_here):
    _, out = dpo_run
    before = (out / "metrics.jsonl").read_text()
    result = run_here("train_dpo.py", *dpo_args(tiny_model_dir, out, tmp_path))
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert (out / "metrics.jsonl").read_text() == before


def test_init_adapter_that_is_not_an_adapter_exits_2(tiny_model_dir, tmp_path, run_here):
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "rl", "--init_adapter",
                                                       str(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: init_adapter {tmp_path} is not a PEFT adapter dir (no adapter_config.json)")


def test_init_adapter_from_another_base_exits_2(tiny_model_dir, tmp_path, run_here):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    adapter_dir = tmp_path / "other_adapter"
    get_peft_model(other, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(adapter_dir)
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "rl", "--init_adapter",
                                                       str(adapter_dir)))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: init_adapter {adapter_dir} does not fit model_name_or_path")
    assert not (tmp_path / "rl" / "metrics.jsonl").exists()


def test_dpo_on_cpu_trains_with_freed_memory_kept_and_hands_it_back(tiny_model_dir, tmp_path, run_here, monkeypatch):
    """TRL's DPO steps free and reallocate full-vocabulary logits: on a CPU they run with glibc
    keeping freed memory (rlhf.cpu_memory), which goes back to the system once training is done."""
    import trl

    from rlhf import cpu_memory

    events = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: events.append("keep") or True)
    monkeypatch.setattr(cpu_memory, "_kept", False)
    monkeypatch.setattr(cpu_memory, "release_freed_memory",
                        lambda stop_keeping=False: events.append("release" + "+stop" * stop_keeping))
    train = trl.DPOTrainer.train
    monkeypatch.setattr(trl.DPOTrainer, "train", lambda self, *a, **k: events.append("train") or train(self, *a, **k))
    result = run_here("train_dpo.py", *dpo_args(tiny_model_dir, tmp_path / "out", tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert events == ["keep", "train", "release+stop"]  # glibc's own thresholds back too


def test_dpo_trains_on_conversational_pairs_with_an_implicit_prompt(tiny_model_dir, tmp_path, run_here):
    """TRL's conversational, implicit-prompt format (trl-lib/ultrafeedback_binarized's): before,
    "lacks column(s) prompt"."""
    rows = [{"chosen": [{"role": "user", "content": f"Topic {i}?"}, {"role": "assistant", "content": "Lovely!"}],
             "rejected": [{"role": "user", "content": f"Topic {i}?"}, {"role": "assistant", "content": "No."}]}
            for i in range(8)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = dpo_args(tiny_model_dir, out, tmp_path)
    args[args.index("--dataset") + 1] = args[args.index("--eval_dataset") + 1] = str(pairs)
    result = run_here("train_dpo.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a base model's tokenizer: no chat template (GPT-2's, Pythia's)."""
    import shutil

    base = tmp_path_factory.mktemp("no-template") / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    return base


def test_dpo_trains_text_pairs_on_a_model_without_chat_template(base_model_dir, tmp_path, run_here):
    """TRL's standard (text) format as TRL trains it: before, the pairs were always turned into chat
    messages, and a tokenizer without a template failed ('Cannot use chat template functions')."""
    from rlhf.models import load_tokenizer

    assert not load_tokenizer(str(base_model_dir)).chat_template
    out = tmp_path / "out"
    args = dpo_args(base_model_dir, out, tmp_path)
    args[args.index("--max_steps") + 1] = "1"
    result = run_here("train_dpo.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert read_metrics(out)[-1]["train_steps"] == 1


def test_dpo_refuses_chat_pairs_on_a_model_without_chat_template(base_model_dir, tmp_path, run_here):
    rows = [{"prompt": [{"role": "user", "content": f"Topic {i}?"}], "chosen": [{"role": "assistant", "content": "Yes"}],
             "rejected": [{"role": "assistant", "content": "No."}]} for i in range(4)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_here("train_dpo.py", "--model_name_or_path", str(base_model_dir), "--output_dir", str(tmp_path / "out"),
                      "--dataset", str(pairs))
    assert_one_line_error(result, f"preference pairs of {pairs} are chat messages", "has no chat template")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Yo"}], "rejected": "No."},
     "row 0: rejected is a string but chosen is chat messages"),
    ({"prompt": "Hi", "chosen": "", "rejected": "No."}, "row 0: chosen must be a non-empty string"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
      "rejected": [{"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]},
     "row 0: chosen and rejected must begin with the same prompt"),
    ({"prompt": "Hi", "chosen": "Yo"}, "lacks column(s) rejected"),
])
def test_malformed_preference_rows_exit_2(row, message, tmp_path, run_here):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(row) + "\n")
    for script in ("train_dpo.py", "train_reward_model.py"):
        result = run_here(script, "--output_dir", str(tmp_path / script), "--dataset", str(pairs))
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr


def test_preference_rows_of_mixed_forms_and_implicit_text_prompts(tmp_path):
    """Review of 787ff9d: rows mixing strings and chat messages passed the per-row check and ended in
    a jinja TypeError; TRL's shared beginning of two texts ends mid-word ("...Assistant: B"), and
    DPO then put a chat turn inside the word. The cut now falls between words."""
    from rlhf.data import load_preference_dataset
    from rlhf.errors import DataError

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "Hi", "chosen": "Yo", "rejected": "No"}) + "\n"
                     + json.dumps({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Yo"}],
                                   "rejected": [{"role": "assistant", "content": "No"}]}) + "\n")
    with pytest.raises(DataError, match="row 1 is chat messages beside a text prompt, row 0 strings"):
        load_preference_dataset(str(mixed))
    implicit = tmp_path / "implicit.jsonl"
    human = "\n\nHuman: What color is the sky?\n\nAssistant: "
    implicit.write_text(json.dumps({"chosen": human + "Blue, on a clear day.", "rejected": human + "Bright green."}))
    row = load_preference_dataset(str(implicit))[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (human, "Blue, on a clear day.", "Bright green.")
