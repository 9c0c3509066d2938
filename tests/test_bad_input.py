"""Bad input: one clear line on stderr, exit code 2, no traceback, earlier outputs intact.

Every case runs its script in this process (run_here): the exit code and stderr are what a user
sees, without a new interpreter per case; the scripts' subprocess runs live in test_train_e2e.py."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, tiny_args


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--clip_rnage", "0.1"], ["clip_rnage", "did you mean 'clip_range'"]),
        (["--clip_range", "-1"], ["clip_range must be > 0"]),
        (["--mini_batch_size", "5"], ["mini_batch_size 5 must divide", "16"]),
        (["--learning_rate", "fast"], ["learning_rate expects float"]),
        (["--advantage_estimator", "vtrace"], ["advantage_estimator 'vtrace'", "gae"]),
        (["--config", "does/not/exist.yaml"], ["config file not found"]),
        (["--config", "/tmp"], ["config file /tmp is a folder, not a YAML file"]),
        (["--reward_weights", "1.0", "2.0"], ["reward_weights has 2 values"]),
        (["--gradient_accumulation_steps", "3"], ["gradient_accumulation_steps 3 must divide"]),
        (["--learning_rate=-1e-4"], ["learning_rate must be in (0, 10], got -0.0001"]),
        # argparse read -1e-4 and -1e3 as flags: "argument --learning_rate: expected one argument"
        (["--learning_rate", "-1e-4"], ["learning_rate must be in (0, 10], got -0.0001"]),
        (["--seed", "-1e3"], ["seed must be an integer in 0..4294967295, got -1000"]),
        (["--lora_r", "1e-400"], ["lora_r expects int, got '1e-400'"]),  # was "must be >= 1, got 0"
        # a value given under TRL's name is refused in that name (was "ppo_epochs must be >= 1")
        (["--num_iterations", "0"], ["num_iterations (ppo_epochs here) must be >= 1, got 0"]),
        (["--beta", "-0.1"], ["beta (kl_coef here) must be >= 0, got -0.1"]),
        (["--learning_rate", "1e38"], ["learning_rate must be in (0, 10], got 1e+38"]),
        (["--temperature", "0"], ["temperature must be >= 1e-06", "got 0"]),
        (["--temperature", "1e-46"], ["temperature must be >= 1e-06", "got 1e-46"]),
        (["--policy_loss_kwargs", "{\"clip_range\": 1e39}"], ["policy_loss_kwargs clip_range must be within float32 range"]),
        (["--top_p", "1.5"], ["top_p must be in (0, 1], got 1.5"]),
        (["--top_p", "0"], ["top_p must be in (0, 1], got 0.0"]),
        (["--gamma", "1.01"], ["gamma must be in [0, 1], got 1.01"]),
        (["--lam=-0.1"], ["lam must be in [0, 1], got -0.1"]),
        (["--max_consecutive_skips", "0"], ["max_consecutive_skips must be >= 1"]),
        (["--reward_error", "ignore"], ["reward_error 'ignore' is not one of: raise, skip_batch, zero"]),
        (["--rollout_batch_size", "0"], ["rollout_batch_size must be >= 1"]),
    ],
)
def test_bad_cli_values_exit_2(args, fragments, tmp_path, run_here):
    result = run_here("train_ppo.py", "--output_dir", str(tmp_path / "out"), *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_config_given_through_a_pipe_is_read(tmp_path):
    """`--config <(envsubst < ppo.yaml)` hands the script a pipe; until 2026-12-07 it said
    'config file not found'."""
    import os
    import threading

    from rlhf.config import RLConfig
    from rlhf.parsing import parse_dataclass

    pipe = tmp_path / "config.fifo"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=("learning_rate: 0.003\nmax_steps: 7\n",))
    writer.start()
    try:
        config = parse_dataclass(RLConfig, ["--config", str(pipe)])
    finally:
        # a writer that has closed the pipe may still be alive a moment: wait for it, and only one still
        # blocked on an unread pipe gets a reader (a blocking open with no writer would hang: it did once)
        writer.join(timeout=10)
        if writer.is_alive():
            reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(timeout=10)
            os.close(reader)
    assert (config.learning_rate, config.max_steps) == (0.003, 7)


def test_a_config_that_is_not_text_is_refused_in_one_line(tmp_path, run_here):
    config = tmp_path / "weights.yaml"
    config.write_bytes(bytes(range(128, 256)))
    assert_one_line_error(run_here("train_ppo.py", "--config", str(config), "--output_dir", str(tmp_path / "out")),
                          f"config file {config} cannot be read")
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_yaml(tmp_path, run_here):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 1e-4\nkl_coeff: 0.1\n")
    assert_one_line_error(run_here("train_ppo.py", "--config", str(config)), "kl_coeff", "kl_coef")


def test_every_unknown_key_of_a_config_is_named_in_one_refusal(tmp_path, run_here):
    """A TRL user's open-r1 recipe holds a dozen keys with no setting here; each run named only the
    first, so the recipe took a dozen refused runs to clear."""
    config = tmp_path / "recipe.yaml"
    config.write_text("benchmarks: []\nlearning_rate: 1e-5\nlr: 1e-5\ncallbacks: [push_to_hub_revision]\n"
                      "use_vllm: true\nwarmup_ratio: 0.1\n")
    result = run_here("train_grpo.py", "--config", str(config), "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, f"5 config keys in {config} have no setting here: benchmarks, lr (did you mean "
                                  "'learning_rate'?), callbacks, use_vllm: True (responses are generated by the policy",
                          "warmup_ratio (set warmup_steps = warmup_ratio x")
    assert not (tmp_path / "out").exists()
    config.write_text("learning_rate: 1e-5\nkl_coeff: 0.1\n")  # one key: the message as before
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config)),
                          f"unknown config key 'kl_coeff' in {config}; did you mean 'kl_coef'?")


def test_a_trl_recipe_hears_of_every_problem_of_a_source_at_once(tmp_path, tiny_model_dir, run_here):
    """A stranger's review of the one-refusal change: a value error (save_steps 0.1) came alone, then
    the unknown keys a run later; several unknown command-line flags came one per run; the flags
    read at some values (--trust_remote_code false, --use_vllm false) were unknown flags; 'did you
    mean' sent gradient_checkpointing_kwargs to gradient_checkpointing (since read at use_reentrant
    false); null for trust_remote_code was refused; RLConfig.from_dict took save_steps 0.5 as a step
    count (a save every step)."""
    from rlhf import RLConfig
    from rlhf.errors import ConfigError

    config = tmp_path / "recipe.yaml"
    config.write_text("save_steps: 0.1\nlog_level: info\ngradient_checkpointing_kwargs: {use_reentrant: false}\n"
                      "lr_scheduler_kwargs: {}\ntrust_remote_code: null\nmodel_revision: null\nload_in_8bit: no\n")
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config), "--output_dir", str(tmp_path / "out")),
                          f"several problems in {config}: save_steps expects int, got 0.1 (TRL reads a value below 1",
                          "; and 2 config keys in", "have no setting here: log_level, lr_scheduler_kwargs; see --help")
    assert not (tmp_path / "out").exists()
    result = run_here("train_grpo.py", "--output_dir", str(tmp_path / "out"), "--foo", "1", "--log_level", "info",
                      "--hub_strategy", "end")
    assert_one_line_error(result, "3 config keys in the command line have no setting here: foo, log_level, hub_strategy")
    # read at the values that say what happens here, on the command line as in a file: the run goes
    # on to the first check of its own settings
    result = run_here("train_grpo.py", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                      "--trust_remote_code", "false", "--use_vllm", "false", "--attn_implementation", "sdpa",
                      "--model_revision", "main", "--max_steps", "0")
    assert_one_line_error(result, "max_steps must be >= 1, got 0")
    result = run_here("train_grpo.py", "--output_dir", str(tmp_path / "out"), "--use_vllm")
    assert_one_line_error(result, "use_vllm 'true' (TRL's setting) in the command line has no counterpart")
    for settings in ({"save_steps": 0.5}, {"save_steps": "0.5"}):
        with pytest.raises(ConfigError, match=r"save_steps expects int, got .*0.5.* \(TRL reads a value below 1"):
            RLConfig.from_dict(settings)
    with pytest.raises(ConfigError, match=r"eval_steps expects int, got 0.25 \(TRL reads"):
        RLConfig(eval_steps=0.25)
    assert RLConfig(save_steps=3.0).save_steps == 3 and RLConfig.from_dict({"dataset_prompt_column": "question"}
                                                                           ).prompt_column == "question"


def test_config_values_of_odd_types_and_names_get_one_true_line(tmp_path, run_here):
    """A second stranger's review: RLConfig refused numpy ints (new today); a YAML key that is not a
    name (`1: 2`) and RLConfig(max_steps=None) were tracebacks; `--use_vllm no` and an unquoted
    `save_strategy: no` (YAML's false) were refused; --fp16 was answered "did you mean 'bf16'?" and
    --deepspeed "did you mean 'seed'?"; `do_eval: true` was "unknown" though `do_eval: false` is
    read; train_dpo.py's save_steps 0.5 was told about RL steps; problems came in set order."""
    import numpy as np

    from rlhf import RLConfig
    from rlhf.errors import ConfigError

    assert RLConfig(max_steps=np.int64(5), save_steps=np.int32(2)).max_steps == 5
    for settings, message in (({"max_steps": None}, "max_steps expects int, got None"),
                              ({"learning_rate": "1e-5"}, "learning_rate expects float, got '1e-5'")):
        with pytest.raises(ConfigError, match=message):
            RLConfig(**settings)
    with pytest.raises(ConfigError, match="RLConfig.from_dict: every key must be a setting's name, got 1"):
        RLConfig.from_dict({1: 2})
    assert RLConfig.from_dict({"use_vllm": 0, "load_in_4bit": 0.0, "max_new_tokens": 8}).max_new_tokens == 8
    config = tmp_path / "recipe.yaml"
    config.write_text("1: 2\n")
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config)),
                          f"config file {config}: every key must be a setting's name, got 1")
    config.write_text("save_strategy: no\neval_strategy: no\nuse_vllm: off\ndo_eval: no\n")
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config), "--use_vllm", "no", "--max_steps", "0"),
                          "max_steps must be >= 1, got 0")
    assert_one_line_error(run_here("train_grpo.py", "--fp16", "true", "--deepspeed", "ds.json"),
                          "2 config keys in the command line have no setting here: fp16, deepspeed; see --help")
    assert_one_line_error(run_here("train_grpo.py", "--do_eval"),
                          "do_eval 'true' (TRL's setting) in the command line has no counterpart of that meaning here: "
                          "evaluation runs every eval_steps")
    assert_one_line_error(run_here("train_dpo.py", "--use_vllm", "--output_dir", str(tmp_path / "dpo")),
                          "use_vllm 'true' (TRL's setting) in the command line has no counterpart of that meaning here; "
                          "only false / 0")
    config.write_text("use_vllm: true\nfoo: 1\n")  # with another key: was an IndexError traceback
    assert_one_line_error(run_here("train_dpo.py", "--config", str(config), "--output_dir", str(tmp_path / "dpo")),
                          f"2 config keys in {config} have no setting here: use_vllm: True (only false / 0",
                          "), foo; see --help")
    result = run_here("train_dpo.py", "--save_steps", "0.5", "--output_dir", str(tmp_path / "dpo"))
    assert_one_line_error(result, "save_steps expects int, got '0.5'")
    assert "RL steps" not in result.stderr
    config.write_text("save_steps: 0.1\nzeta: 1\nlogging_steps: 0.5\nalpha: 2\nlearning_rate: abc\n")
    result = run_here("train_grpo.py", "--config", str(config), "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, f"several problems in {config}: save_steps expects int, got 0.1")
    line = result.stderr.strip().splitlines()[-1]
    assert line.index("save_steps") < line.index("logging_steps") < line.index("learning_rate") < line.index("zeta")


def test_trl_model_settings_that_say_what_happens_here_are_read(tmp_path, tiny_model_dir, run_here):
    """TRL's ModelConfig keys at the values that describe how a model loads here (a TRL recipe's
    trust_remote_code: false, attn_implementation: sdpa, ...) were unknown keys."""
    config = tmp_path / "recipe.yaml"
    config.write_text("trust_remote_code: false\nattn_implementation: sdpa\nload_in_4bit: false\nload_in_8bit: false\n"
                      "model_revision: main\nmax_steps: 0\n")
    # read past every one of them: the run stops at the first check of our own settings
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config), "--model_name_or_path", str(tiny_model_dir),
                                   "--output_dir", str(tmp_path / "out")), "max_steps must be >= 1, got 0")


@pytest.mark.parametrize("line,fragment", [
    ("system_prompt: You are helpful.", "system_prompt (open-r1's setting) in {config} has no counterpart of that "
                                        "meaning here: there is no system-prompt setting: give the prompts as conversations"),
    ("max_steps: -1", "max_steps must be >= 1, got -1 (TRL's -1, train for num_train_epochs, has no counterpart"),
    ("save_steps: 0.25", "save_steps expects int, got 0.25 (TRL reads a value below 1 as that fraction of the run's "
                         "steps; here save_steps counts RL steps: set it to 0.25 x max_steps, rounded)"),
    ("eval_steps: 0.5", "eval_steps expects int, got 0.5 (TRL reads a value below 1 as that fraction"),
    ("attn_implementation: flash_attention_2", "attn_implementation 'flash_attention_2' (TRL's setting) in {config} "
                                               "has no counterpart of that meaning here: models load with transformers' "
                                               "default attention"),
    ("trust_remote_code: true", "trust_remote_code True (TRL's setting) in {config} has no counterpart"),
    ("load_in_4bit: true", "load_in_4bit True (TRL's setting) in {config} has no counterpart of that meaning here: no "
                           "quantized loading")])
def test_trl_recipe_values_of_another_meaning_say_what_to_set(line, fragment, tmp_path, run_here):
    """A TRL user's values that TRL reads otherwise: open-r1's system_prompt was answered "did you mean
    'eval_num_prompts'?", max_steps -1 and a fractional save_steps got no word of TRL's meaning."""
    config = tmp_path / "recipe.yaml"
    config.write_text(line + "\n")
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config), "--output_dir", str(tmp_path / "out")),
                          fragment.format(config=config))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line,fragment", [("max_steps: true", "max_steps expects int, got True"),
                                           ("learning_rate: false", "learning_rate expects float, got False")])
def test_a_yaml_boolean_in_a_numeric_key_is_refused(line, fragment, tmp_path, run_here):
    """YAML reads true/false as booleans, which Python would take as 1 and 0 (max_steps: true ran one step)."""
    config = tmp_path / "bad.yaml"
    config.write_text(line + "\n")
    result = run_here("train_ppo.py", "--config", str(config), "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_help_lists_every_key_with_default(run_here):
    result = run_here("train_ppo.py", "--help")
    assert result.returncode == 0
    from rlhf.config import RLConfig
    import dataclasses

    for f in dataclasses.fields(RLConfig):
        assert f"--{f.name}" in result.stdout, f.name
    assert "default: 0.2" in result.stdout  # clip_range


@pytest.mark.parametrize(
    "content,fragments",
    [
        ('{"prompt": "ok"}\n{"prompt": \n', ["data.jsonl:2: malformed JSON row"]),
        ('{"prompt": "ok"}\n["a list"]\n', ["data.jsonl:2: each line must be a JSON object"]),
        ("", ["has no rows"]),
        ("\n\n", ["has no rows"]),
        ('{"text": "no prompt column"}\n', ["no column 'prompt'", "text"]),
        ('{"prompt": "fine"}\n{"prompt": ""}\n', ["row 1"]),
    ],
)
def test_bad_dataset_files(content, fragments, tiny_model_dir, tmp_path, run_here):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--dataset", str(data)))
    assert_one_line_error(result, *fragments)


def test_missing_dataset_file(tiny_model_dir, tmp_path, run_here):
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--dataset", "nope.jsonl"))
    assert_one_line_error(result, "dataset not found: nope.jsonl")


@pytest.mark.parametrize(
    "body,fragments",
    [
        ("    return [{'score': 1}] * len(completions)\n", ["returned {'score': 1} for sample 0"]),
        ("    return [1.0]\n", ["returned 1 values for 4 completions"]),
        ("    raise KeyError('score')\n", ["raised KeyError"]),
        ("    return [float('nan')] * len(completions)\n", ["returned nan"]),
        ("    return [float('inf')] * len(completions)\n", ["returned inf"]),
        ("    return ['high'] * len(completions)\n", ["returned 'high'"]),
    ],
)
def test_broken_reward_functions(body, fragments, tiny_model_dir, tmp_path, run_here):
    reward_file = tmp_path / "reward.py"
    reward_file.write_text("def broken(prompts, completions, **kwargs):\n" + body)
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--reward_funcs",
                                                       f"{reward_file}:broken"))
    assert_one_line_error(result, "broken", *fragments)


@pytest.mark.parametrize(
    "spec,fragments",
    [
        ("no_such_reward", ["unknown reward 'no_such_reward'", "sentiment"]),
        ("missing_file.py:fn", ["reward file not found"]),
        ("json:not_there", ["has no function 'not_there'"]),
        ("no_such_module_xyz:fn", ["cannot import module 'no_such_module_xyz'"]),
        ("http://127.0.0.1:9/", ["remote reward http://127.0.0.1:9/ failed after"]),
    ],
)
def test_unloadable_rewards(spec, fragments, tiny_model_dir, tmp_path, run_here):
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--reward_funcs", spec))
    assert_one_line_error(result, *fragments)


def test_missing_model_dir(tmp_path, run_here):
    result = run_here("train_reinforce.py", "--model_name_or_path", str(tmp_path / "nope"), "--output_dir",
                      str(tmp_path / "out"))
    assert_one_line_error(result, "cannot load")


def test_reward_file_with_import_error_shows_user_line(tiny_model_dir, tmp_path, run_here):
    reward_file = tmp_path / "typo.py"
    reward_file.write_text("import math\n\nSCALE = math.tau / undefined_name\n")
    result = run_here("train_reinforce.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--reward_funcs",
                                                       f"{reward_file}:f"))
    assert_one_line_error(result, "failed to import", "NameError", "typo.py:3")


def test_reward_model_training_bad_pairs(tmp_path, run_here):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a"}\n')
    result = run_here("train_reward_model.py", "--dataset", str(pairs), "--output_dir", str(tmp_path / "rm"))
    assert_one_line_error(result, "lacks column(s) rejected")
    result = run_here("train_reward_model.py", "--num_train_epochs", "0", "--output_dir", str(tmp_path / "rm"))
    assert_one_line_error(result, "num_train_epochs")


@pytest.mark.parametrize("script", ["train_grpo.py", "train_trpo.py", "train_dpo.py", "train_reward_model.py",
                                    "evaluate.py", "plot_metrics.py", "compare_algorithms.py", "benchmark.py",
                                    "serve_reward.py", "make_preference_data.py"])
def test_every_script_prints_help(script, run_here):
    result = run_here(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


def test_yaml_syntax_error_names_the_line(tmp_path, run_here):
    config = tmp_path / "broken.yaml"
    config.write_text("learning_rate: 1e-4\nlora_target_modules: [q_proj, v_proj\nkl_coef: 0.1\n")
    result = run_here("train_ppo.py", "--config", str(config), "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, f"config file {config}:3: not valid YAML")
    assert not (tmp_path / "out").exists()


def test_long_prompts_are_truncated_with_a_count_or_refused(tiny_model_dir, tmp_path, run_here):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 200}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    args = tiny_args(tiny_model_dir, tmp_path / "out", "--dataset", str(data), "--max_steps", "1",
                     "--rollout_batch_size", "2", "--mini_batch_size", "2")
    refused = run_here("train_reinforce.py", *args, "--prompt_overflow", "error")
    assert_one_line_error(refused, f"1 of 2 prompts in {data} are longer than max_prompt_length 48 tokens",
                          "first: row 0", "prompt_overflow: truncate")
    truncated = run_here("train_reinforce.py", *args)
    assert truncated.returncode == 0, truncated.stderr[-2000:]
    assert f"1 of 2 prompts in {data} are longer than max_prompt_length 48 tokens" in truncated.stderr


def test_resume_from_missing_or_corrupted_checkpoint(tiny_model_dir, tmp_path, run_here):
    out = tmp_path / "run"
    assert run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--save_steps", "1")).returncode == 0
    resume = ("--max_steps", "3", "--resume_from_checkpoint")
    before = (out / "metrics.jsonl").read_text()

    missing = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, *resume, str(out / "checkpoints" / "step-9")))
    assert_one_line_error(missing, "step-9 is not a complete checkpoint")

    step = out / "checkpoints" / "step-2"
    (step / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    broken_adapter = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, *resume, "latest"))
    assert_one_line_error(broken_adapter, f"checkpoint {step} is corrupted: adapter_model.safetensors unreadable")

    (step / "trainer_state.json").write_text("{ half a json")
    broken_state = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, *resume, "latest"))
    assert_one_line_error(broken_state, f"checkpoint {step} is corrupted: trainer_state.json unreadable")

    for name in (out / "checkpoints" / "step-1" / "accelerate").iterdir():
        if name.name.startswith("optimizer"):
            name.write_bytes(b"garbage")
    broken_optimizer = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, *resume,
                                                           str(out / "checkpoints" / "step-1")))
    assert_one_line_error(broken_optimizer, "is corrupted: optimizer/RNG state unreadable")
    assert (out / "metrics.jsonl").read_text() == before  # a failed resume drops no rows


def test_output_dir_that_cannot_be_written(tiny_model_dir, tmp_path, run_here):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a directory")
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, blocker / "run"))
    assert_one_line_error(result, f"output_dir {blocker / 'run'} is not writable", "choose another --output_dir")
    assert blocker.read_text() == "I am a file, not a directory"


@pytest.mark.parametrize(
    "script,args,fragments",
    [
        ("train_grpo.py", ["--per_device_train_batch_size", "4"],
         ["per_device_train_batch_size (TRL's setting)", "mini_batch_size = completions per optimizer step"]),
        ("train_grpo.py", ["--generation_batch_size", "0"], ["generation_batch_size must be >= 1"]),
        ("train_grpo.py", ["--loss_type", "vespo", "--importance_sampling_level", "sequence"],
         ["loss_type 'vespo'", "importance_sampling_level must be 'token'"]),
        ("train_grpo.py", ["--loss_type", "cispo", "--delta", "2"], ["policy loss 'cispo' has no parameter 'delta'"]),
        ("train_grpo.py", ["--advantage_kwargs", '{"scale_rewards": "global"}'],
         ["advantage_kwargs", "scale_rewards must be one of group, batch, none"]),
        ("train_grpo.py", ["--max_completion_length", "8", "--max_new_tokens", "8"],
         ["max_completion_length (TRL's name) and max_new_tokens both set max_new_tokens"]),
        ("train_grpo.py", ["--num_iterations", "two"], ["num_iterations (TRL's name for ppo_epochs)", "expects int"]),
        ("train_grpo.py", ["--warmup_ratio", "0.1"], ["set warmup_steps = warmup_ratio x"]),
        ("train_grpo.py", ["--vllm_mode", "colocate"], ["vllm_mode", "no vLLM mode"]),
        ("train_grpo.py", ["--bf16", "maybe"], ["bf16 expects bool, got 'maybe'"]),
        ("train_grpo.py", ["--kl_beta", "0.1"], ["did you mean 'kl_coef'"]),
        ("train_reward_model.py", ["--max_steps", "0"], ["max_steps must be >= 1, or -1"]),
        ("train_reward_model.py", ["--lr_scheduler_type", "fast"], ["lr_scheduler_type 'fast' is not one of"]),
        ("train_dpo.py", ["--dtype", "float16"], ["dtype 'float16'", "bf16 true"]),
    ],
)
def test_trl_names_that_differ_exit_2(script, args, fragments, tmp_path, run_here):
    result = run_here(script, "--output_dir", str(tmp_path / "out"), *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_trl_alias_and_own_name_in_one_yaml_exit_2(tmp_path, run_here):
    config = tmp_path / "trl.yaml"
    config.write_text("beta: 0.1\nkl_coef: 0.2\n")
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config)),
                          "beta (TRL's name) and kl_coef both set kl_coef", str(config))
    config.write_text("per_device_train_batch_size: 4\n")
    assert_one_line_error(run_here("train_grpo.py", "--config", str(config)), "mini_batch_size")


def test_a_tokenizer_larger_than_the_models_embedding_is_refused(tmp_path, run_here):
    """A tokenizer with added tokens next to a model never resized: before, the first rollout
    failed with a bare IndexError from the embedding."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import FIXTURES

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "small-vocab"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = run_here("train_grpo.py", *tiny_args(model_dir, tmp_path / "out", "--num_generations", "2"))
    assert_one_line_error(result, f"the tokenizer has {len(tokenizer)} tokens", "1000 rows", "resize_token_embeddings")


def test_a_tokenizer_within_the_embedding_passes_the_check(tiny_model_dir):
    """Qwen2.5's embedding has more rows than its tokenizer has tokens (151936 vs 151665): fine."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf.errors import ConfigError
    from rlhf.models import check_tokenizer_fits

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for rows, fits in ((len(tokenizer), True), (len(tokenizer) + 256, True), (len(tokenizer) - 1, False)):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
        if fits:
            check_tokenizer_fits(model, tokenizer)
        else:
            with pytest.raises(ConfigError, match=f"has {rows} rows"):
                check_tokenizer_fits(model, tokenizer)
    # peft's trainable-token indices wrap the embedding in a module without num_embeddings
    import peft

    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    assert not hasattr(wrapped.get_input_embeddings(), "num_embeddings")
    with pytest.raises(ConfigError, match=f"has {len(tokenizer) - 1} rows"):
        check_tokenizer_fits(wrapped, tokenizer)


ALLOCATION_FAILED = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 50331648 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [RuntimeError(ALLOCATION_FAILED), MemoryError()])
def test_a_run_that_runs_out_of_memory_stops_in_one_line_and_keeps_its_checkpoints(error, tiny_model_dir, tmp_path,
                                                                                    run_here, monkeypatch):
    """An allocation past the machine's memory, a cgroup's limit or ``ulimit -v`` (torch's CPU
    allocator raises the RuntimeError above): before 2026-12-07 a traceback and exit 1 (a
    reviewer's 111 MB model under ``ulimit -v 2600000``)."""
    from rlhf import trainer

    rollouts = []
    sample_rollout = trainer.sample_rollout

    def failing_in_step_two(*args, **kwargs):
        rollouts.append(1)
        if len(rollouts) == 2:
            raise error
        return sample_rollout(*args, **kwargs)

    monkeypatch.setattr(trainer, "sample_rollout", failing_in_step_two)
    out = tmp_path / "run"
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, out, "--save_steps", "1"))
    found = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 50331648 bytes" \
        if isinstance(error, RuntimeError) else "an allocation failed"
    assert_one_line_error(result, f"out of memory: {found}", "smaller batches")
    assert (out / "checkpoints" / "step-1").is_dir()  # what was written before stays


def test_another_runtime_error_keeps_its_traceback(tiny_model_dir, tmp_path, run_here, monkeypatch):
    from rlhf import trainer

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer, "sample_rollout", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "run"))


@pytest.mark.parametrize("left_mb", [28, 8192])
def test_a_onednn_product_that_fails_with_no_memory_left_is_out_of_memory(left_mb, tiny_model_dir, tmp_path, run_here,
                                                                           monkeypatch):
    """oneDNN says only "could not create a primitive" when its memory runs out (a reviewer's run
    under ``ulimit -v 2600000``, 28 MB left); with memory left it is another error and keeps its traceback."""
    from rlhf import cli, trainer

    def failing(*args, **kwargs):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(trainer, "sample_rollout", failing)
    monkeypatch.setattr(cli, "_memory_left", lambda: left_mb << 20)
    args = tiny_args(tiny_model_dir, tmp_path / "run")
    if left_mb < 1024:
        assert_one_line_error(run_here("train_grpo.py", *args),
                              "out of memory: oneDNN could not create a primitive with 28 MB left to this process")
    else:
        with pytest.raises(RuntimeError, match="could not create a primitive"):
            run_here("train_grpo.py", *args)


def test_out_of_memory_is_told_from_other_errors():
    import errno

    import torch

    from rlhf.cli import out_of_memory

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert out_of_memory(cuda).startswith("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. Shorter")
    assert out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory")).startswith("out of memory: [Errno 12]")
    assert out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ...")).startswith(
        "out of memory: CUDA error: out of memory. Shorter")
    for other in (OSError(errno.ENOENT, "No such file"), RuntimeError("a bug"),
                  RuntimeError("could not create a primitive descriptor for a matmul primitive")):
        assert out_of_memory(other) is None


NOT_TEXT = bytes(range(128, 160))  # not UTF-8, not JSON, not a safetensors header


@pytest.fixture
def trained_adapter(tiny_model_dir, tmp_path):
    """A run dir (config.yaml, metrics.jsonl) whose final/ holds a small LoRA of the tiny model."""
    from test_evaluate import make_adapter

    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "final", seed=1)
    (run / "config.yaml").write_text("run_name: demo\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    return run / "final"


@pytest.mark.parametrize("broken,script,fragment", [
    ("adapter_model.safetensors", "evaluate.py", "is corrupted: its adapter_model.safetensors is unreadable"),
    ("adapter_model.safetensors", "export.py", "is corrupted: its adapter_model.safetensors is unreadable"),
    ("adapter_model.safetensors", "init_adapter", "is unreadable: Error while deserializing header"),
    ("adapter_config.json", "evaluate.py", "cannot read"),
    ("base model.safetensors", "train_grpo.py", "cannot load model"),
    ("base model.safetensors", "evaluate.py", "cannot load model"),
])
def test_a_corrupted_weights_or_adapter_file_stops_in_one_line(broken, script, fragment, trained_adapter, tiny_model_dir,
                                                                tmp_path, run_here):
    """Files cut short or overwritten (a full disk, a half-copied checkpoint); until 2026-12-07 each
    of these ended in a SafetensorError or UnicodeDecodeError traceback with exit code 1."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    adapter_config = trained_adapter / "adapter_config.json"
    adapter_config.write_text(adapter_config.read_text().replace(str(tiny_model_dir), str(base)))
    if broken == "base model.safetensors":
        (base / "model.safetensors").write_bytes(NOT_TEXT)
    else:
        (trained_adapter / broken).write_bytes(NOT_TEXT)
    out = tmp_path / "out"
    if script == "evaluate.py":
        checkpoint = base if broken.startswith("base") else trained_adapter
        result = run_here("evaluate.py", "--checkpoints", str(checkpoint), "--output_dir", str(out),
                          "--num_prompts", "1", "--num_samples", "1", "--max_new_tokens", "2")
    elif script == "export.py":
        result = run_here("export.py", "--checkpoint", str(trained_adapter), "--output_dir", str(out))
    else:
        extra = ("--init_adapter", str(trained_adapter)) if script == "init_adapter" else ()
        result = run_here("train_grpo.py", *tiny_args(base, out, *extra))
    assert_one_line_error(result, fragment)
    assert not (out / "report.json").exists() and not (out / "metrics.jsonl").exists()


def test_files_that_are_not_text_stop_in_one_line_or_are_passed_over(trained_adapter, tiny_model_dir, tmp_path,
                                                                     run_here):
    """A chat template or metrics file that is not text: one line (was a UnicodeDecodeError
    traceback)."""
    template = tmp_path / "template.jinja"
    template.write_bytes(NOT_TEXT)
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--chat_template", str(template)))
    assert_one_line_error(result, f"chat_template {template} cannot be read")

    run = trained_adapter.parent
    (run / "metrics.jsonl").write_bytes(NOT_TEXT)
    assert_one_line_error(run_here("plot_metrics.py", str(run)), f"{run / 'metrics.jsonl'} is not UTF-8 text")
    (run / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    assert_one_line_error(run_here("plot_metrics.py", str(run)), "line 2 is not a JSON object of metrics")


@pytest.mark.parametrize("content,fragment", [
    (NOT_TEXT, "the run's config is unreadable"),
    (b"- a list\n", "the run's config must be a mapping of key: value, got list"),
    (b"", "must be a mapping of key: value, got NoneType"),
    (b"reward_funcs: 5\n", "the run's reward_funcs is 5, not what a run saves (a list of str or none)"),
    (b"reward_funcs: [sentiment]\nreward_kwargs: [1]\n", "the run's reward_kwargs is [1]"),
    (b"chat_template: 5\n", "the run's chat_template is 5"),
])
@pytest.mark.parametrize("script", ["evaluate.py", "export.py"])
def test_a_damaged_run_config_stops_evaluation_and_export_before_they_write(content, fragment, script, trained_adapter,
                                                                            tmp_path, run_here):
    """evaluate.py read a run config.yaml it could not parse as missing: it scored with the default
    reward and rewrote the adapter's card as 'RL fine-tune of unknown ... scored by no reward
    function'; wrong-typed settings ended in tracebacks (found by a stranger's review)."""
    run = trained_adapter.parent
    (run / "config.yaml").write_bytes(content)
    card_before = (trained_adapter / "README.md").read_bytes() if (trained_adapter / "README.md").exists() else None
    out = tmp_path / "out"
    if script == "evaluate.py":
        result = run_here("evaluate.py", "--checkpoints", str(trained_adapter), "--output_dir", str(out),
                          "--num_prompts", "1", "--num_samples", "1", "--max_new_tokens", "2")
    else:
        result = run_here("export.py", "--checkpoint", str(trained_adapter), "--output_dir", str(out))
    assert_one_line_error(result, f"{run / 'config.yaml'}: ", fragment)
    assert not out.exists()
    after = (trained_adapter / "README.md").read_bytes() if (trained_adapter / "README.md").exists() else None
    assert after == card_before and not (trained_adapter / "evaluation.json").exists()


@pytest.mark.parametrize("script", ["train_grpo.py", "train_reward_model.py"])
def test_a_reward_model_with_corrupted_weights_stops_in_one_line(script, tiny_reward_backbone, tiny_model_dir, tmp_path,
                                                                  run_here):
    import shutil

    reward_model = tmp_path / "reward_model"
    shutil.copytree(tiny_reward_backbone, reward_model)
    (reward_model / "model.safetensors").write_bytes(NOT_TEXT)
    if script == "train_grpo.py":
        args = [*tiny_args(tiny_model_dir, tmp_path / "out")[:-2], "--reward_funcs", str(reward_model)]
        fragment = f"cannot load reward model '{reward_model}'"
    else:
        args = ["--model_name_or_path", str(reward_model), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
        fragment = f"cannot load reward backbone '{reward_model}'"
    assert_one_line_error(run_here(script, *args), fragment, "deserializing header")


@pytest.mark.parametrize("name,content,fragment", [
    ("config.json", b"[1, 2]", "cannot load"),
    ("config.json", b"7", "cannot load"),
    ("tokenizer_config.json", b"[1, 2]", "cannot load tokenizer"),
    ("generation_config.json", b"[1, 2]", "generation_config.json, which names the model's stop tokens"),
    ("generation_config.json", NOT_TEXT, "generation_config.json, which names the model's stop tokens"),
])
def test_a_model_dir_with_a_damaged_config_file_stops_in_one_line(name, content, fragment, tiny_model_dir, tmp_path,
                                                                  run_here):
    """JSON of another shape ended in a TypeError/AttributeError traceback from transformers; a
    damaged generation_config.json was read as missing, so its extra stop ids (Llama-3's
    <|eot_id|>) silently went unseen (found by a stranger's review)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if name == "generation_config.json" and not (model / name).exists():
        (model / name).write_text('{"eos_token_id": [2, 3]}')
    (model / name).write_bytes(content)
    assert_one_line_error(run_here("train_grpo.py", *tiny_args(model, tmp_path / "out")), fragment)


@pytest.mark.parametrize("content", [NOT_TEXT, b"[1]", b""])
def test_a_reward_model_with_damaged_calibration_stops_in_one_line(content, tiny_reward_backbone, tiny_model_dir,
                                                                   tmp_path, run_here):
    import shutil

    reward_model = tmp_path / "reward_model"
    shutil.copytree(tiny_reward_backbone, reward_model)
    (reward_model / "rlhf_reward_model.json").write_bytes(content)
    args = [*tiny_args(tiny_model_dir, tmp_path / "out")[:-2], "--reward_funcs", str(reward_model)]
    assert_one_line_error(run_here("train_grpo.py", *args), "rlhf_reward_model.json")


def test_a_reused_runs_damaged_metrics_stop_the_comparison_in_one_line(tmp_path):
    """compare_algorithms.py --reuse read a reused run's metrics.jsonl after the whole evaluation
    and ended in a traceback there; rlhf.compare now reads it before the evaluation, checked."""
    from rlhf.compare import seconds_per_step
    from rlhf.errors import DataError

    run = tmp_path / "ppo"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "step_time_s": 2.0}\n{"step": 2, "step_time_s": 4.0}\n')
    assert seconds_per_step(run) == 3.0
    for content, fragment in ((NOT_TEXT, "is not UTF-8 text"), (b"[1]\n", "line 1 is not a JSON object"),
                              (b'{"step": 1, "step_t\n{"step": 2}\n', "line 1 is not valid JSON")):
        (run / "metrics.jsonl").write_bytes(content)
        with pytest.raises(DataError, match=fragment):
            seconds_per_step(run)


def test_an_adapter_config_whose_base_is_not_a_name_is_refused(trained_adapter, tmp_path, run_here):
    config = trained_adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": 5}))
    result = run_here("export.py", "--checkpoint", str(trained_adapter), "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "adapter_config.json does not name its base model")


@pytest.mark.parametrize("name,folder", [("run.json", True), ("config.yaml", True), (".run.lock", True),
                                         ("metrics.jsonl", True), ("abandoned", False), ("checkpoints", False)])
def test_an_output_dir_entry_of_the_wrong_kind_stops_before_anything_is_written(name, folder, tiny_model_dir, tmp_path,
                                                                                 run_here):
    """A folder where the run writes a file (or a file where it keeps a folder) ended the start in
    IsADirectoryError / NotADirectoryError, some of it after run.json was rewritten (found by a
    stranger's review)."""
    out = tmp_path / "out"
    assert run_here("train_grpo.py", *tiny_args(tiny_model_dir, out, "--save_steps", "1")).returncode == 0
    path = out / name
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.mkdir() if folder else path.write_text("")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3", "--resume_from_checkpoint",
                                                  "latest"))
    assert_one_line_error(result, f"{name} is a {'folder' if folder else 'file'}, where the run keeps its")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("edit,fragment", [
    ({"r": "abc"}, "adapter_config.json: r must be a positive integer, got 'abc'"),
    ({"r": 0}, "adapter_config.json: r must be a positive integer, got 0"),
    ({"lora_alpha": "x"}, "adapter_config.json: lora_alpha must be a number, got 'x'"),
    ({"target_modules": 5}, "adapter_config.json: target_modules must be a module name or a list of them, got 5"),
    ({"peft_type": None}, "adapter_config.json: peft_type must name a PEFT method"),
    ({"peft_type": "lora"}, "adapter_config.json: peft_type must name a PEFT method as peft writes it"),
    ({"bias": 3}, "adapter_config.json: bias must be none, all or lora_only, got 3"),
])
@pytest.mark.parametrize("script", ["evaluate.py", "export.py", "init_adapter"])
def test_an_adapter_config_setting_of_the_wrong_type_is_one_line(edit, fragment, script, trained_adapter, tiny_model_dir,
                                                                  tmp_path, run_here):
    """A hand-edited adapter_config.json: peft's TypeError (`"r": "abc"`) or KeyError ('peft_type')
    surfaced as a traceback or as a raw key name (found by a stranger's review)."""
    config = trained_adapter / "adapter_config.json"
    settings = {**json.loads(config.read_text()), **edit}
    config.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    out = tmp_path / "out"
    if script == "evaluate.py":
        result = run_here("evaluate.py", "--checkpoints", str(trained_adapter), "--output_dir", str(out),
                          "--num_prompts", "1", "--num_samples", "1", "--max_new_tokens", "2")
    elif script == "export.py":
        result = run_here("export.py", "--checkpoint", str(trained_adapter), "--output_dir", str(out))
    else:
        result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, out, "--init_adapter", str(trained_adapter)))
    assert_one_line_error(result, fragment)
    assert not (out / "report.json").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "model.safetensors").exists()


def test_a_refused_start_leaves_no_empty_output_dir_behind(tiny_model_dir, tmp_path, run_here):
    """The writability probe made output_dir (and its parents) before the model and dataset were
    read; a start refused there left them behind, empty (found by a stranger's review). A dir
    that was there before stays."""
    made = tmp_path / "runs" / "new" / "out"
    result = run_here("train_grpo.py", *tiny_args(tmp_path / "no-model", made))
    assert_one_line_error(result, "cannot load model")
    assert not (tmp_path / "runs").exists()
    made.mkdir(parents=True)
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, made, "--dataset", str(tmp_path / "none.jsonl")))
    assert_one_line_error(result, "dataset not found")
    assert made.is_dir()


def test_a_missing_local_reward_backbone_is_named_as_a_path(tmp_path, run_here):
    """Was transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" for a
    path that does not exist (the policy model's loader already said what is missing)."""
    missing = tmp_path / "no-backbone"
    result = run_here("train_reward_model.py", "--model_name_or_path", str(missing), "--output_dir",
                      str(tmp_path / "out"), "--max_steps", "1")
    assert_one_line_error(result, f"cannot load reward backbone '{missing}': no such local dir")


@pytest.mark.parametrize("missing", ["model", "dataset", "reward"])
def test_a_trl_named_run_with_a_missing_input_prints_its_error_line_alone(missing, tiny_model_dir, tmp_path, run_here):
    """A config in TRL's names hears warnings (TRL defaults it leaves out, max_steps' other meaning);
    before, they were printed as it was parsed, so a model, dataset or reward file that is not
    there came as its error line after four lines of warnings."""
    args = tiny_args(tiny_model_dir, tmp_path / "out", "--beta", "0.1")
    where = {"model": ("--model_name_or_path", str(tmp_path / "no-model")),
             "dataset": ("--dataset_name", str(tmp_path / "no-data.jsonl")),
             "reward": ("--reward_funcs", f"{tmp_path / 'no_rewards.py'}:score")}[missing]
    result = run_here("train_grpo.py", *args, *where)
    assert_one_line_error(result, where[1].split(":")[0])
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_trl_named_run_that_trains_hears_its_warnings(tiny_model_dir, tmp_path, run_here):
    """The warnings held back while the trainer is built are shown once it is, before training."""
    args = tiny_args(tiny_model_dir, tmp_path / "out", "--beta", "0.1", "--max_steps", "1", "--save_steps", "0")
    result = run_here("train_grpo.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("this config uses TRL's names") == 2, result.stderr
    assert "max_steps 1 counts RL steps" in result.stderr


def test_resume_from_a_trl_checkpoint_says_what_it_is(trained_adapter, tiny_model_dir, tmp_path, run_here):
    """A reviewer's: TRL's checkpoint-N was refused as 'trainer_state.json is invalid: no 'step'
    entry; restore the file', as if a file of ours were damaged."""
    import shutil

    trl_checkpoint = tmp_path / "trl-run" / "checkpoint-5"
    trl_checkpoint.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(trained_adapter / name, trl_checkpoint / name)
    (trl_checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "out", "--resume_from_checkpoint",
                                                  str(trl_checkpoint)))
    assert_one_line_error(result, f"{trl_checkpoint} is a checkpoint of transformers' Trainer (TRL's checkpoint-N)",
                          f"init_adapter {trl_checkpoint}")
    started = run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "again", "--max_steps", "1",
                                                   "--init_adapter", str(trl_checkpoint)))
    assert started.returncode == 0, started.stderr[-2000:]
