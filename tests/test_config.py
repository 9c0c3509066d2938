"""Config precedence, parsing and validation (in-process, fast)."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import yaml

from conftest import ROOT
from rlhf import cli
from rlhf.cli import ALGORITHM_DEFAULTS, DOCUMENTED_CONFIGS, parse_dpo_args, parse_reward_model_args, parse_train_args
from rlhf.config import RLConfig, parse_config, save_config
from rlhf.dpo import DPORunConfig
from rlhf.errors import ConfigError
from rlhf.evaluate import EvalConfig
from rlhf.parsing import parse_dataclass
from rlhf.reward_training import RewardModelConfig


def test_precedence_default_script_yaml_cli(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("learning_rate: 2.0e-5\nkl_coef: 0.2\nreward_funcs: [sentiment, a.py:f]\n")
    config = parse_config(["--config", str(config_file), "--kl_coef", "0.3"],
                          {"advantage_estimator": "reinforce", "policy_loss": "pg", "learning_rate": 1.0})
    assert config.advantage_estimator == "reinforce"  # script default
    assert config.learning_rate == 2e-5                # yaml over script default
    assert config.kl_coef == 0.3                       # cli over yaml
    assert config.reward_funcs == ["sentiment", "a.py:f"]
    assert config.value_clip_range == 0.2 and config.clip_range is None  # dataclass defaults (none = the loss's own)


def test_cli_types_lists_bools_and_none():
    config = parse_config(["--reward_funcs", "sentiment", "x.py:g", "--reward_weights", "1", "0.5",
                           "--whiten_advantages", "false", "--max_grad_norm", "none", "--max_steps", "3"])
    assert config.reward_weights == [1.0, 0.5]
    assert config.whiten_advantages is False
    assert config.max_grad_norm is None
    assert config.max_steps == 3


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"gamma": 1.5}, "gamma"),
        ({"advantage_estimator": "grpo", "num_generations": 1}, "num_generations >= 2"),
        ({"rollout_batch_size": 6, "mini_batch_size": 4}, "must divide"),
        ({"report_to": ["mlflow"]}, "report_to"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_impossible_values_raise(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RLConfig(**overrides)


def test_world_size_checks():
    config = RLConfig(rollout_batch_size=6, mini_batch_size=6)
    with pytest.raises(ConfigError, match="cannot be split into whole groups over 4 processes"):
        config.check_world_size(4)
    config.check_world_size(2)


# ---------------------------------------------------------------------------- TRL's names (issue 18 part 6)

TRL_FLAGS = ["--max_completion_length", "20", "--num_iterations", "3", "--beta", "0.1", "--epsilon", "0.3",
             "--epsilon_high", "0.35", "--dataset_name", "data.jsonl", "--dataset_train_split", "tr",
             "--dataset_test_split", "te", "--loss_type", "dr_grpo", "--scale_rewards", "none"]
OUR_FLAGS = ["--max_new_tokens", "20", "--ppo_epochs", "3", "--kl_coef", "0.1", "--clip_range", "0.3",
             "--clip_range_high", "0.35", "--dataset", "data.jsonl", "--dataset_split", "tr",
             "--eval_dataset_split", "te", "--policy_loss", "ppo_clip", "--loss_agg_mode", "seq-mean-token-sum-norm",
             "--advantage_kwargs", '{"scale_rewards": false}']
GROUP = ["--advantage_estimator", "grpo", "--num_generations", "4"]


def test_trl_names_on_the_cli_and_in_yaml_are_ours(tmp_path):
    ours = parse_config(OUR_FLAGS + GROUP)
    assert parse_config(TRL_FLAGS + GROUP) == ours
    yaml_file = tmp_path / "trl.yaml"
    yaml_file.write_text("".join(f"{k[2:]}: {v}\n" for k, v in zip(TRL_FLAGS[::2], TRL_FLAGS[1::2])))
    assert parse_config(["--config", str(yaml_file), *GROUP]) == ours
    save_config(ours, tmp_path / "config.yaml")  # what a run saves: our names only
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "max_new_tokens" in saved and not {"max_completion_length", "beta", "loss_type"} & set(saved)


@pytest.mark.parametrize("loss_type,policy_loss,agg", [
    ("grpo", "ppo_clip", "seq-mean-token-mean"),        # per-sequence token mean, then mean over sequences
    ("dapo", "ppo_clip", "token-mean"),                 # tokens of the whole accumulated batch
    ("dr_grpo", "ppo_clip", "seq-mean-token-sum-norm"),  # B x max_completion_length
    ("cispo", "cispo", "token-mean"),
    ("bnpo", "ppo_clip", "micro-batch-token-mean"),      # each micro-batch's token mean, averaged
    ("sapo", "sapo", "seq-mean-token-mean"),
    ("luspo", "luspo", "seq-mean-token-sum"),
    ("vespo", "vespo", "token-mean"),
])
def test_trl_loss_types(loss_type, policy_loss, agg):
    config = parse_config(["--loss_type", loss_type, *GROUP])
    assert (config.policy_loss, config.loss_agg_mode) == (policy_loss, agg)


def test_trl_epsilon_high_is_the_cispo_cap_and_sequence_level_is_the_losss_own(tmp_path):
    config = parse_config(["--loss_type", "cispo", "--epsilon_high", "5", *GROUP])
    assert config.policy_loss_kwargs == {"epsilon_high": 5.0} and config.clip_range_high is None
    yaml_file = tmp_path / "c.yaml"  # loss_type in the file, epsilon_high on the command line
    yaml_file.write_text("loss_type: cispo\nadvantage_estimator: grpo\nnum_generations: 4\n")
    assert parse_config(["--config", str(yaml_file), "--epsilon_high", "4"]).policy_loss_kwargs == {"epsilon_high": 4.0}
    config = parse_config(["--loss_type", "grpo", "--importance_sampling_level", "sequence", *GROUP])
    # TRL's clip ranges (0.2) at the sequence level: ppo_clip's, not our gspo entry's paper band
    assert (config.policy_loss, config.loss_agg_mode) == ("ppo_clip", "seq-mean-token-mean")
    assert config.policy_loss_kwargs == {"importance_sampling_level": "sequence"}


@pytest.mark.parametrize("value,scale", [("group", True), ("true", True), ("batch", "batch"), ("none", False), ("false", False)])
def test_trl_scale_rewards(value, scale):
    assert parse_config(["--scale_rewards", value, *GROUP]).advantage_kwargs == {"scale_rewards": scale}


def test_trl_model_keys():
    assert parse_config(["--dtype", "bfloat16"]).bf16 is True
    assert parse_config(["--torch_dtype", "float32", "--use_peft"]).bf16 is False


@pytest.mark.parametrize("argv,fragment", [
    (["--loss_type", "luspo", "--importance_sampling_level", "token"], "needs importance_sampling_level 'sequence'"),
    (["--loss_type", "nope"], "loss_type 'nope' is not one of TRL's grpo, dapo"),
    (["--scale_rewards", "sometimes"], "scale_rewards 'sometimes' is not one of TRL's"),
    (["--beta", "0.1", "--kl_coef", "0.2"], "beta (TRL's name) and kl_coef both set kl_coef"),
    (["--scale_rewards", "none", "--advantage_kwargs", '{"scale_rewards": true}'], "both set advantage_kwargs.scale_rewards"),
    (["--per_device_train_batch_size", "4"], "mini_batch_size = completions per optimizer step"),
    (["--warmup_ratio", "0.1"], "set warmup_steps = warmup_ratio x"),
    (["--num_train_epochs", "2"], "set max_steps = num_train_epochs x"),
    (["--steps_per_generation", "2"], "set rollout_batch_size = steps_per_generation x"),
    (["--use_peft", "false"], "always LoRA"),
])
def test_trl_names_refused_with_our_key(argv, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_config(argv + GROUP)


def test_alias_and_own_name_in_one_yaml_file(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("max_completion_length: 20\nmax_new_tokens: 30\n")
    with pytest.raises(ConfigError, match=f"both set max_new_tokens in {re.escape(str(yaml_file))}"):
        parse_config(["--config", str(yaml_file)])
    yaml_file.write_text("max_completion_length: 20\n")  # a flag overrides a file, whichever name each uses
    assert parse_config(["--config", str(yaml_file), "--max_new_tokens", "30"]).max_new_tokens == 30


def test_a_whole_number_written_as_a_float_is_read_on_the_command_line_as_in_a_file(tmp_path):
    """YAML's max_steps: 3.0 and RLConfig(max_steps=3.0) were read as 3; before, --max_steps 3.0
    (and --save_steps 1e3, which YAML files write too) was refused on the command line."""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("max_steps: 3.0\nsave_steps: 1000.0\n")
    from_file = parse_config(["--config", str(yaml_file)])
    from_flags = parse_config(["--max_steps", "3.0", "--save_steps", "1e3"])
    assert (from_file.max_steps, from_file.save_steps) == (from_flags.max_steps, from_flags.save_steps) == (3, 1000)
    assert type(from_flags.max_steps) is int and type(from_flags.save_steps) is int
    for value in ("2.5", "nan", "inf", "three"):
        with pytest.raises(ConfigError, match=re.escape(f"max_steps expects int, got '{value}'")):
            parse_config(["--max_steps", value])


@pytest.mark.parametrize("key,suggestion", [("kl_beta", "kl_coef"), ("max_length", "max_new_tokens"),
                                            ("cliprange", "clip_range"), ("gae_lambda", "lam"),
                                            ("num_ppo_epochs", "ppo_epochs"), ("lr", "learning_rate")])
def test_did_you_mean_by_meaning_before_spelling(key, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        parse_config([f"--{key}", "1"])


def _bool_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool)]


@pytest.mark.parametrize("cls", ["RLConfig", "DPORunConfig", "RewardModelConfig", "EvalConfig"])
def test_bare_boolean_flags(cls):
    classes = {"RLConfig": RLConfig, "DPORunConfig": DPORunConfig, "RewardModelConfig": RewardModelConfig,
               "EvalConfig": EvalConfig}
    extra = ["--checkpoints", "a"] if cls == "EvalConfig" else []
    for name in _bool_fields(classes[cls]):
        for argv, value in (([f"--{name}"], True), ([f"--{name}", "false"], False), ([f"--{name}=true"], True)):
            if name == "dynamic_sampling" or name == "filter_zero_std_groups":
                argv = argv + GROUP
            config = parse_dataclass(classes[cls], argv + extra)
            assert getattr(config, name) is value, (name, argv)
    assert parse_dataclass(RLConfig, ["--bf16", "--max_steps", "3"]).max_steps == 3


def test_a_refused_trl_config_is_its_error_alone_and_an_accepted_one_hears_its_warnings():
    """Before, a config in TRL's names printed its warnings (defaults that differ, max_steps' other
    meaning) and then was refused: several lines of stderr for one error."""
    import warnings

    trl_named = ["--max_completion_length", "32", "--beta", "0.1", "--max_steps"]
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="max_steps must be >= 1, got 0"):
            parse_config(trl_named + ["0"])
        with pytest.raises(ConfigError, match="max_steps must be >= 1, got 0"):
            RLConfig.from_dict({"max_completion_length": 32, "beta": 0.1, "max_steps": 0})
    assert [str(w.message) for w in heard] == []
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        assert parse_config(trl_named + ["3.0"]).max_steps == 3
        RLConfig.from_dict({"max_completion_length": 32, "beta": 0.1, "max_steps": 3.0})
    messages = [str(w.message) for w in heard]
    assert len(messages) == 4 and sum("max_steps 3 counts RL steps" in m for m in messages) == 2, messages


def test_a_refusal_names_the_trl_key_the_config_gave():
    with pytest.raises(ConfigError, match=re.escape("epsilon (clip_range here) must be > 0")):
        RLConfig.from_dict({"epsilon": 0.0})
    with pytest.raises(ConfigError, match="^clip_range must be > 0"):
        RLConfig.from_dict({"clip_range": 0.0})
    # a TRL name translated into another kind of setting keeps our name: the message is about that
    # (a reviewer's: "loss_type (loss_agg_mode here) micro-batch-token-mean (TRL's bnpo) needs ...")
    with pytest.raises(ConfigError, match=re.escape("loss_agg_mode micro-batch-token-mean (TRL's bnpo) needs")):
        parse_train_args("trpo", ["--loss_type", "bnpo"])


def test_the_reward_model_configs_numbers_are_finite():
    """A reviewer's: nan passed every comparison of RewardModelConfig's checks (DPO: test_dpo)."""
    for flag in ("--learning_rate", "--weight_decay", "--max_grad_norm"):
        with pytest.raises(ConfigError, match=f"{flag[2:]} must be a finite number, got nan"):
            parse_dataclass(RewardModelConfig, [flag, "nan"])
    assert parse_dataclass(RewardModelConfig, ["--weight_decay", "0.1"]).weight_decay == 0.1


def test_open_r1s_prompt_column_name_is_read_by_evaluate_too():
    """open-r1's dataset_prompt_column is RLConfig's prompt_column; before, evaluate.py, run on the
    same recipe's names, refused it as an unknown key."""
    evaluated = parse_dataclass(EvalConfig, ["--checkpoints", "a", "--dataset_prompt_column", "problem"])
    assert evaluated.prompt_column == "problem" == parse_config(["--dataset_prompt_column", "problem"]).prompt_column


def test_trainer_keys_of_reward_model_and_dpo_reach_their_training_arguments(tmp_path):
    from trl import DPOConfig, RewardConfig

    from rlhf.trainer_keys import TrainerKeys, trainer_kwargs

    flags = ["--max_steps", "7", "--per_device_train_batch_size", "3", "--learning_rate", "1e-3",
             "--num_train_epochs", "2", "--logging_steps", "2", "--save_steps", "4", "--save_total_limit", "1",
             "--gradient_accumulation_steps", "2", "--seed", "5", "--weight_decay", "0.01", "--lr_scheduler_type",
             "cosine", "--warmup_steps", "3", "--max_grad_norm", "0.5", "--report_to", "tensorboard",
             "--gradient_checkpointing"]
    for parse, trl_cls in ((parse_reward_model_args, RewardConfig), (parse_dpo_args, DPOConfig)):
        config = parse(flags)
        args = trl_cls(output_dir=str(tmp_path), **trainer_kwargs(config))
        for f in dataclasses.fields(TrainerKeys):
            expected = getattr(config, f.name)
            assert getattr(args, f.name) == (expected if f.name != "report_to" else ["tensorboard"]), f.name
        assert args.save_strategy == "steps"
    assert RewardConfig(output_dir=str(tmp_path), **trainer_kwargs(parse_reward_model_args([]))).save_strategy == "no"
    assert parse_dpo_args(["--warmup_ratio", "0.1", "--dataset_name", "p.jsonl"]).warmup_steps == 0.1


def test_reward_model_max_steps_stops_the_trainer(tiny_reward_backbone, tmp_path):
    import json

    from rlhf.reward_training import train_reward_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "Glad to help!", "rejected": "No."}) + "\n"
                             for i in range(32)))
    config = parse_reward_model_args(["--model_name_or_path", str(tiny_reward_backbone), "--dataset", str(pairs),
                                      "--output_dir", str(tmp_path / "rm"), "--max_steps", "2",
                                      "--per_device_train_batch_size", "2", "--save_steps", "1"])
    assert train_reward_model(config)["train_steps"] == 2  # 16 steps in one epoch without max_steps
    assert sorted(p.name for p in (tmp_path / "rm").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# ---------------------------------------------------------------------------- script defaults, prog (part 7)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_CONFIGS))
def test_no_config_trains_as_the_documented_config(name, tmp_path, monkeypatch):
    parse = {"dpo": parse_dpo_args, "reward_model": parse_reward_model_args}.get(
        name, lambda argv: parse_train_args(name, argv))
    documented = ROOT / "configs" / DOCUMENTED_CONFIGS[name]
    monkeypatch.chdir(tmp_path)  # a run from elsewhere finds it too
    assert parse([]) == parse(["--config", str(documented)])
    if name not in ("dpo", "reward_model"):  # and equals what the old entry point made of the file
        assert parse([]) == parse_config(["--config", str(documented)], ALGORITHM_DEFAULTS[name])


def test_grpo_help_shows_the_documented_values(run_here):
    result = run_here("train_grpo.py", "--help")
    text = " ".join(result.stdout.split())
    assert "Defaults from configs/grpo.yaml" in text
    assert re.search(r"--mini_batch_size MINI_BATCH_SIZE [^-]*\(default: 8\)", text)
    assert re.search(r"--ppo_epochs PPO_EPOCHS [^-]*\(default: 2\)", text)


def test_documented_config_absent_falls_back_to_built_in_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "CONFIG_DIR", tmp_path)
    assert parse_train_args("grpo", []) == parse_config([], ALGORITHM_DEFAULTS["grpo"])
    assert "Defaults built in" in cli.documented_config("grpo")[1]


@pytest.mark.parametrize("argv,prog", [(["train", "ppo"], "rlhf train ppo"), (["train", "dr_grpo"], "rlhf train dr_grpo"),
                                       *[([name], f"rlhf {name}") for name in cli.COMMANDS]])
def test_rlhf_subcommand_help_names_itself(argv, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_every_script_is_an_rlhf_command():
    commands = {name.replace("-", "_") for name in cli.COMMANDS} | {f"train_{a}" for a in ALGORITHM_DEFAULTS}
    scripts = {path.stem for path in (ROOT / "scripts").glob("*.py")}
    aliases_of_scripts = {"train_dpo": "train_dpo", "evaluate": "evaluate"}
    assert scripts - commands - set(aliases_of_scripts) == set()


def test_help_texts_name_only_files_in_the_repository():
    from rlhf.benchmark import BenchmarkConfig

    texts = [f.metadata["help"] for cls in (RLConfig, DPORunConfig, RewardModelConfig, EvalConfig, BenchmarkConfig)
             for f in dataclasses.fields(cls)]
    texts += [cli.documented_config(name)[1] for name in DOCUMENTED_CONFIGS]
    for text in texts:
        assert "RL_NOTES" not in text, text
        for name in re.findall(r"[\w/-]*\w\.md\b|configs/[\w/-]+\.yaml", text):
            assert (ROOT / name).is_file(), (name, text)


def test_the_python_api_trains_the_algorithm_its_estimator_names(tmp_path):
    """A stranger's review: RLConfig.from_dict with TRL's GRPO settings built PPO (gae, a value
    head, KL in the reward, batch whitening), and RLConfig(advantage_estimator="grpo") kept PPO's
    KL-in-reward and whitening, unlike train_grpo.py with the same keys. The settings that follow
    the estimator now come from it unless given; what the user gives wins."""
    import dataclasses

    from rlhf import RLConfig
    from rlhf.cli import parse_train_args
    from rlhf.errors import ConfigError

    def algorithm(config):
        return {key: getattr(config, key) for key in ("advantage_estimator", "policy_loss", "num_generations",
                                                      "whiten_advantages", "kl_in_reward", "kl_estimator",
                                                      "loss_agg_mode")}

    trl = RLConfig.from_dict({"num_generations": 2, "beta": 0.04, "loss_type": "grpo", "max_completion_length": 6,
                              "rollout_batch_size": 2, "mini_batch_size": 4})
    assert trl.advantage_estimator == "grpo" and not trl.needs_value_head
    assert (trl.kl_in_reward, trl.kl_estimator, trl.whiten_advantages, trl.kl_coef) == (False, "k3", False, 0.04)
    assert trl.num_generations == 2 and trl.loss_agg_mode == "seq-mean-token-mean"  # given (loss_type grpo)

    plain = tmp_path / "plain.yaml"
    plain.write_text("max_steps: 2\n")
    for estimator, script in (("grpo", "grpo"), ("dr_grpo", "dr_grpo"), ("rloo", "rloo"), ("reinforce", "reinforce"),
                              ("gae", "ppo")):
        from_script = algorithm(parse_train_args(script, ["--config", str(plain)]))
        assert algorithm(RLConfig(advantage_estimator=estimator)) == from_script, estimator
        assert algorithm(RLConfig.from_dict({"advantage_estimator": estimator})) == from_script, estimator
    assert RLConfig(advantage_estimator="grpo", kl_in_reward=True, kl_estimator="k2").kl_estimator == "k2"
    assert RLConfig(advantage_estimator="grpo", kl_in_reward=True).kl_in_reward is True
    assert RLConfig.from_dict({"whiten_advantages": True}).whiten_advantages is True

    # a config file or flag that picks another estimator than the script's gets that estimator's
    # defaults (the script's documented config gives way too), as RLConfig does; so does a subclass
    rloo = tmp_path / "rloo.yaml"
    rloo.write_text("advantage_estimator: rloo\n")
    assert algorithm(parse_train_args("ppo", ["--config", str(rloo)])) == algorithm(RLConfig(advantage_estimator="rloo"))
    assert algorithm(parse_train_args("grpo", ["--advantage_estimator", "rloo"])) == \
        algorithm(RLConfig(advantage_estimator="rloo"))
    assert algorithm(parse_train_args("ppo", ["--advantage_estimator", "reinforce"])) == \
        algorithm(RLConfig(advantage_estimator="reinforce"))

    @dataclasses.dataclass
    class MyConfig(RLConfig):
        note: str = ""

    assert algorithm(MyConfig(advantage_estimator="grpo")) == algorithm(RLConfig(advantage_estimator="grpo"))
    with pytest.raises(ConfigError, match="advantage_estimator"):
        RLConfig(advantage_estimator=["grpo"])


def test_trls_use_vllm_false_is_read_and_true_refused():
    """use_vllm: false (a common line of TRL configs) said "no counterpart"; it is what happens here."""
    from rlhf import RLConfig
    from rlhf.errors import ConfigError

    assert RLConfig.from_dict({"use_vllm": False, "max_steps": 2}).max_steps == 2
    with pytest.raises(ConfigError, match="use_vllm .*there is no vLLM mode"):
        RLConfig.from_dict({"use_vllm": True})


def test_trl_names_of_another_meaning_are_told_where_a_trl_config_gives_them(tmp_path):
    """A TRL recipe's max_steps (TRL: optimizer steps) and generation_batch_size (TRL: completions per
    generation round) ran with this project's meanings without a word (a session's left-alone list)."""
    from rlhf import RLConfig
    from rlhf.cli import parse_train_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("beta: 0.0\nlearning_rate: 1.0e-6\nlr_scheduler_type: linear\nmax_steps: 3\n"
                      "generation_batch_size: 8\nmax_completion_length: 8\nnum_generations: 4\n")
    with pytest.warns(UserWarning, match=r"max_steps 3 counts RL steps \(a rollout of rollout_batch_size x "
                                         r"num_generations completions and 2 optimizer steps each .*generation_batch_size 8 "
                                         r"is how many rows are sampled at once"):
        parse_train_args("grpo", ["--config", str(recipe), "--rollout_batch_size", "4", "--mini_batch_size", "8"])
    with pytest.warns(UserWarning, match=r"mean something else here: max_steps 5 counts RL steps"):
        RLConfig.from_dict({"max_completion_length": 8, "beta": 0.0, "learning_rate": 1e-6, "lr_scheduler_type": "linear",
                            "max_steps": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own names: nothing to say
        parse_train_args("grpo", ["--max_steps", "3", "--generation_batch_size", "8"])
        RLConfig.from_dict({"max_new_tokens": 8, "max_steps": 5})


def test_a_trl_recipe_is_read_as_trl_means_it(tmp_path):
    """Real open-r1 recipes run through train_grpo.py (a helper's review): torch_dtype and bf16 that
    agree were refused; sync_ref_model: false and eval_strategy/save_strategy "no" (what happens
    here anyway) were refused; a --advantage_kwargs flag dropped the recipe's scale_rewards: false
    (Dr. GRPO became GRPO); a recipe without beta trained with KL 0.05 where TRL has none, silently."""
    from rlhf import RLConfig
    from rlhf.cli import parse_train_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("torch_dtype: bfloat16\nbf16: true\nsync_ref_model: false\neval_strategy: 'no'\n"
                      "save_strategy: 'no'\nuse_vllm: false\nloss_type: dr_grpo\nscale_rewards: false\n"
                      "num_generations: 4\nmax_completion_length: 16\n")
    with pytest.warns(UserWarning, match=r"beta \(kl_coef 0.05 here, TRL's default 0.0: no KL term\)"):
        config = parse_train_args("grpo", ["--config", str(recipe), "--advantage_kwargs", '{"eps": 0.0001}'])
    assert config.bf16 and config.advantage_kwargs == {"scale_rewards": False, "eps": 0.0001}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every differing default given: nothing to say
        RLConfig.from_dict({"num_generations": 4, "beta": 0.0, "learning_rate": 1e-6, "lr_scheduler_type": "linear"})


def test_trl_save_and_eval_strategy_steps_are_read_with_their_step_counts(tmp_path, run_here):
    """A reviewer's: `save_strategy: steps` beside `save_steps: 1` (what save_steps does here) was
    refused ("set save_steps N"); without a step count beside it, TRL's default 500 is not ours."""
    from conftest import assert_one_line_error

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's names: the note on GRPOConfig's other defaults
        config = parse_train_args("grpo", ["--save_strategy", "steps", "--save_steps", "1",
                                           "--eval_strategy", "steps", "--eval_steps", "2"])
    assert (config.save_steps, config.eval_steps) == (1, 2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("save_strategy: steps\nsave_steps: 3\neval_strategy: no\n")  # an unquoted no: YAML's false
    assert parse_dpo_args(["--config", str(recipe)]).save_steps == 3
    for flags, message in (
            (["--save_strategy", "steps"], "save_strategy 'steps' is read with save_steps N >= 1 given beside it, in "
                                           "the same file or on the same command line"),
            (["--save_strategy", "steps", "--save_steps", "0"], "save_strategy 'steps' needs save_steps N >= 1 beside "
                                                                "it, got save_steps 0"),
            (["--save_strategy", "epoch"], "save_strategy 'epoch' (TRL's setting) has no counterpart of that meaning "
                                           "here: set save_steps N, a checkpoint every N RL steps")):
        assert_one_line_error(run_here("train_grpo.py", "--output_dir", str(tmp_path / "out"), *flags), message)
    assert_one_line_error(run_here("train_dpo.py", "--output_dir", str(tmp_path / "dpo"), "--eval_strategy", "steps"),
                          "the held-out pairs (eval_dataset) are evaluated when training ends")


def test_trl_save_and_eval_strategy_no_mean_no_periodic_saves_or_evaluations(tmp_path, run_here):
    """A reviewer's: `--save_strategy no --save_steps 1` was passed over and saved every step (TRL
    saves nothing), as did `--save_strategy no` beside configs/grpo.yaml's save_steps 10."""
    from conftest import assert_one_line_error

    assert parse_train_args("grpo", []).save_steps == 10  # configs/grpo.yaml's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's names: the note on GRPOConfig's other defaults
        config = parse_train_args("grpo", ["--save_strategy", "no", "--eval_strategy", "no"])
    assert (config.save_steps, config.eval_steps) == (0, 0)
    assert parse_reward_model_args(["--save_strategy", "no", "--save_steps", "0"]).save_steps == 0
    for flags, message in (
            (["--save_strategy", "no", "--save_steps", "1"],
             "save_strategy 'no' (never) and save_steps 1 (every 1 steps) contradict each other; give save_steps 0"),
            (["--eval_strategy", "no", "--eval_steps", "5"], "eval_strategy 'no' (never) and eval_steps 5")):
        assert_one_line_error(run_here("train_grpo.py", "--output_dir", str(tmp_path / "out"), *flags), message)
    assert not (tmp_path / "out").exists()
    assert_one_line_error(run_here("train_dpo.py", "--output_dir", str(tmp_path / "dpo"), "--save_strategy", "no",
                                   "--save_steps", "1"), "save_strategy 'no' (never) and save_steps 1")


def test_trl_gradient_checkpointing_kwargs_at_what_happens_here(tmp_path, run_here):
    """open-r1's recipes all carry `gradient_checkpointing_kwargs: {use_reentrant: false}`, which was
    an unknown key: checkpointing here is non-reentrant anyway, so it is read; what would change it
    (use_reentrant true, other keywords) is refused in one line."""
    from conftest import assert_one_line_error

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("gradient_checkpointing: true\ngradient_checkpointing_kwargs: {use_reentrant: false}\n")
    for parse in (lambda argv: parse_train_args("grpo", argv), parse_dpo_args, parse_reward_model_args):
        assert parse(["--config", str(recipe)]).gradient_checkpointing
    parse_train_args("grpo", ["--gradient_checkpointing_kwargs", '{"use_reentrant": false}'])  # read, not refused
    recipe.write_text("gradient_checkpointing: true\ngradient_checkpointing_kwargs: {use_reentrant: true}\n")
    for script in ("train_grpo.py", "train_dpo.py"):
        assert_one_line_error(run_here(script, "--config", str(recipe), "--output_dir", str(tmp_path / script)),
                              "gradient_checkpointing_kwargs use_reentrant True: gradient checkpointing here is always "
                              "torch's non-reentrant checkpoint")
    assert_one_line_error(run_here("train_grpo.py", "--output_dir", str(tmp_path / "out"),
                                   "--gradient_checkpointing_kwargs", '{"preserve_rng_state": false}'),
                          "gradient_checkpointing_kwargs preserve_rng_state False:")
