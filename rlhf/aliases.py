"""TRL's setting names (GRPOConfig, ModelConfig, ScriptArguments, TrainingArguments) read as ours.

Three kinds, per config class: a rename where the meaning is the same (``beta`` -> ``kl_coef``),
a translation where one TRL value sets our keys (``loss_type: dr_grpo`` -> ``policy_loss:
ppo_clip`` + ``loss_agg_mode: seq-mean-token-sum-norm``, read from TRL 1.16's grpo_trainer.py
``_compute_loss``), and a refusal naming our key and the conversion where the meaning differs
(``per_device_train_batch_size`` counts per-process completions; our batch sizes are global).
Pure Python: rlhf.parsing applies these to each source (YAML file, command line) in turn.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from rlhf.errors import ConfigError

_GLOBAL_BATCH = ("batch sizes here are global: rollout_batch_size = prompts per step (x num_generations "
                 "completions), mini_batch_size = completions per optimizer step (TRL: per_device_train_batch_size "
                 "x processes x gradient_accumulation_steps), split into gradient_accumulation_steps micro-batches")
_OPT_STEPS = "max_steps x ppo_epochs x rollout_batch_size x num_generations / mini_batch_size"

# TRL name -> our name, same meaning.
_RL_RENAMES = {
    "max_completion_length": "max_new_tokens", "num_iterations": "ppo_epochs", "beta": "kl_coef",
    "epsilon": "clip_range", "epsilon_high": "clip_range_high", "dataset_name": "dataset",
    "dataset_train_split": "dataset_split", "dataset_test_split": "eval_dataset_split",
    "project": "project_name", "num_completions_to_print": "num_samples_to_log",
    "dataset_prompt_column": "prompt_column",  # open-r1's GRPOScriptArguments
    # The sampler here is our own (or transformers' generate), but the correction is the same.
    "vllm_importance_sampling_clip_min": "importance_sampling_min",
    "vllm_importance_sampling_clip_max": "importance_sampling_max",
    "vllm_importance_sampling_cap": "importance_sampling_max",  # TRL's deprecated name for clip_max
    "environment": "environment_factory",  # the short CLI spelling (--environment file.py:Class)
}
# Reward model / DPO: transformers 5 reads a warmup_steps below 1 as TRL's warmup_ratio.
_PAIRS_RENAMES = {"dataset_name": "dataset", "warmup_ratio": "warmup_steps"}

OPEN_R1_KEYS = {"system_prompt"}  # open-r1's GRPOConfig adds them to TRL's; its recipes carry them
_NO = ("false", "0", "0.0", "none", "no", "off")  # YAML's false, 0 and null; the command line's no / off
# TRL's settings of another meaning (_RL_DIFFERENT, _MODEL_LOADING), at the values that state what
# happens here: read and passed over (TRL configs carry them), not refused
SAYS_WHAT_HAPPENS_HERE: dict[str, tuple[str, ...]] = {
    # an unquoted `no` is YAML's false
    "use_vllm": _NO, "sync_ref_model": _NO, "logging_strategy": ("steps",), "do_eval": _NO,
    # TRL's ModelConfig (model loading), as every model loads here
    "trust_remote_code": _NO, "load_in_4bit": _NO, "load_in_8bit": _NO, "model_revision": ("main", "none"),
    "attn_implementation": ("sdpa", "none"),
}
# TRL's ModelConfig keys at other values: what every script here does instead (every config class)
_MODEL_LOADING = {
    "trust_remote_code": "models load with the code transformers ships (a model class of its own is not run); "
                         "trust_remote_code: false is read",
    "load_in_4bit": "no quantized loading here (the base's weights load in float32 or, with bf16, bfloat16); false is read",
    "load_in_8bit": "no quantized loading here (the base's weights load in float32 or, with bf16, bfloat16); false is read",
    "model_revision": "the model loads at its default revision (a local dir, or the hub's main); main is read",
    "attn_implementation": "models load with transformers' default attention, PyTorch's SDPA where the model has it "
                           "(what the sampler's fast path runs); sdpa is read",
}


def says_what_happens_here(key: str, value: Any) -> bool:
    """Whether TRL's ``key`` at ``value`` states what happens here anyway (``use_vllm: false``): read, not refused."""
    return str(value).strip().lower() in SAYS_WHAT_HAPPENS_HERE.get(key, ())


# TRL name -> why it cannot be mapped, naming our key and the conversion.
_RL_DIFFERENT = {
    "per_device_train_batch_size": f"TRL's per_device_train_batch_size counts completions per process per micro-step; {_GLOBAL_BATCH}",
    "per_device_eval_batch_size": "evaluation samples eval_num_prompts prompts every eval_steps; its batches follow "
                                  "generation_batch_size / logprob_batch_size",
    "steps_per_generation": "one rollout of rollout_batch_size x num_generations completions feeds that / "
                            "mini_batch_size optimizer steps: set rollout_batch_size = steps_per_generation x "
                            "mini_batch_size / num_generations",
    "warmup_ratio": f"set warmup_steps = warmup_ratio x the run's optimizer steps ({_OPT_STEPS})",
    "num_train_epochs": "RL runs count steps: set max_steps = num_train_epochs x prompts in the dataset / rollout_batch_size",
    "top_k": "sampling here has temperature and top_p only",
    "system_prompt": "there is no system-prompt setting: give the prompts as conversations (a list of {role, content} "
                     "messages) that open with the system message",
    "min_p": "sampling here has temperature and top_p only",
    "repetition_penalty": "sampling here has temperature and top_p only",
    "use_vllm": "responses are generated by the policy itself (transformers generate); there is no vLLM mode",
    "logging_strategy": "set logging_steps N",
    "do_eval": "evaluation runs every eval_steps (0 = off) on eval_num_prompts prompts",
    "sync_ref_model": "the KL reference is the initial policy and stays fixed",
    "ref_model_sync_steps": "the KL reference is the initial policy and stays fixed",
}


def _choice(key: str, value: Any, table: dict[str, Any], refused: dict[str, str]) -> Any:
    word = str(value).strip().lower()
    if word in refused:
        raise ConfigError(f"{key} {value!r}: {refused[word]}")
    if word not in table:
        raise ConfigError(f"{key} {value!r} is not one of TRL's {', '.join([*table, *refused])}")
    return table[word]


# TRL 1.16 _compute_loss: loss_type = a per-token loss and a normaliser. grpo / sapo: per-sequence
# token mean, then mean over sequences; bnpo: token mean of each process's micro-batch, averaged;
# dapo / cispo / vespo: token sum / tokens of the whole accumulated batch; dr_grpo: token sum /
# (B x max_completion_length); luspo: token sum per sequence, mean over sequences. grpo, bnpo,
# dr_grpo, dapo and luspo share the clipped ratio (ppo_clip; luspo its sequence-level form).
_LOSS_TYPES = {
    "grpo": ("ppo_clip", "seq-mean-token-mean"), "dapo": ("ppo_clip", "token-mean"),
    "dr_grpo": ("ppo_clip", "seq-mean-token-sum-norm"), "bnpo": ("ppo_clip", "micro-batch-token-mean"),
    "cispo": ("cispo", "token-mean"), "sapo": ("sapo", "seq-mean-token-mean"),
    "luspo": ("luspo", "seq-mean-token-sum"), "vespo": ("vespo", "token-mean"),
}
_LOSS_REFUSED: dict[str, str] = {}


def _loss(given: dict[str, Any]) -> dict[str, Any]:
    """loss_type -> policy_loss + loss_agg_mode; importance_sampling_level -> the loss's own
    importance_sampling_level (TRL's clip ranges stay: epsilon 0.2 at both levels; our gspo entry
    keeps the GSPO paper's 3e-4). TRL 1.16 only warns for luspo at token level and vespo at
    sequence level; here luspo is its sequence-level loss and vespo its token-level one."""
    out: dict[str, Any] = {}
    loss_type = None
    if "loss_type" in given:
        loss_type = str(given["loss_type"]).strip().lower()
        out["policy_loss"], out["loss_agg_mode"] = _choice("loss_type", given["loss_type"], _LOSS_TYPES, _LOSS_REFUSED)
    if "importance_sampling_level" in given:
        level = _choice("importance_sampling_level", given["importance_sampling_level"],
                        {"token": "token", "sequence": "sequence"}, {})
        if loss_type == "luspo" and level != "sequence":
            raise ConfigError("loss_type 'luspo' needs importance_sampling_level 'sequence' (LUSPO is GSPO's "
                              "sequence-level ratio summed over tokens)")
        if loss_type == "vespo" and level != "token":
            raise ConfigError("loss_type 'vespo' computes its sequence weight itself: importance_sampling_level must "
                              "be 'token'")
        # Given explicitly even at token level: the loss type may come from another source (a YAML
        # loss_type luspo and --importance_sampling_level token on the command line must clash).
        out["policy_loss_kwargs"] = {"importance_sampling_level": level}
    return out


def _loss_kwarg(trl_name: str, ours: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A TRL hyperparameter of one loss type -> that loss's own parameter (policy_loss_kwargs);
    null (TRL's off) sets nothing. A loss without the parameter refuses it in one line."""
    def translate(given: dict[str, Any]) -> dict[str, Any]:
        value = given[trl_name]
        if value is None or str(value).strip().lower() in ("none", "null"):
            return {}
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{trl_name} expects a number, got {value!r}") from None
        return {"policy_loss_kwargs": {ours: number}}
    return translate


_LOSS_KWARGS = {"delta": "delta", "sapo_temperature_pos": "temperature_pos", "sapo_temperature_neg": "temperature_neg",
                "vespo_k_pos": "k_pos", "vespo_lambda_pos": "lambda_pos", "vespo_k_neg": "k_neg",
                "vespo_lambda_neg": "lambda_neg"}


def _scale_rewards(given: dict[str, Any]) -> dict[str, Any]:
    """scale_rewards -> grpo's own scale_rewards; multi_objective_aggregation -> reward_aggregation.
    Read together: under normalize_then_sum TRL 1.16 divides the summed rewards by the batch std
    whatever scale_rewards says (grpo_trainer.py, _generate_and_score_completions), which is grpo's
    scale_rewards batch here (the group means of a sum of group-normalised rewards are 0)."""
    out: dict[str, Any] = {}
    if "multi_objective_aggregation" in given:
        aggregations = {"sum_then_normalize": "sum", "normalize_then_sum": "normalize_then_sum"}
        out["reward_aggregation"] = _choice("multi_objective_aggregation", given["multi_objective_aggregation"],
                                            aggregations, {})
    if out.get("reward_aggregation") == "normalize_then_sum":
        out["advantage_kwargs"] = {"scale_rewards": "batch", "eps": 1e-4}  # TRL: (x - mean) / (std + 1e-4)
    elif "scale_rewards" in given:
        scale = _choice("scale_rewards", given["scale_rewards"],
                        {"group": True, "true": True, "batch": "batch", "none": False, "false": False}, {})
        out["advantage_kwargs"] = {"scale_rewards": scale}
    return out


def _dtype(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def translate(given: dict[str, Any]) -> dict[str, Any]:
        refused = {name: "the base model loads in float32, or in bfloat16 with bf16 true"
                   for name in ("auto", "float16", "fp16", "half")}
        return {"bf16": _choice(key, given[key], {"bfloat16": True, "bf16": True, "float32": False, "fp32": False},
                                refused)}
    return translate


def _fixed(key: str, accepted: str, refused: tuple[str, ...], reason: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A TRL setting that is always ``accepted`` here: that value is a no-op, the others refused."""
    def translate(given: dict[str, Any]) -> dict[str, Any]:
        _choice(key, given[key], {accepted: None}, dict.fromkeys(refused, reason))
        return {}
    return translate


def _sampler_correction(given: dict[str, Any]) -> dict[str, Any]:
    """TRL's vllm_importance_sampling_correction (default true) and _mode (default sequence_mask)
    -> importance_sampling_correction: the mode, or none when the correction is off."""
    on = _choice("vllm_importance_sampling_correction", given.get("vllm_importance_sampling_correction", True),
                 {"true": True, "false": False}, {})
    modes = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    mode = _choice("vllm_importance_sampling_mode", given.get("vllm_importance_sampling_mode", "sequence_mask"),
                   {m: m for m in modes}, {})
    return {"importance_sampling_correction": mode if on else "none"}


def _strategy(key: str, steps_key: str | None, instead: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """TRL's save_strategy / eval_strategy beside our ``steps_key`` (save_steps / eval_steps), read
    with it from the same source: "steps" is what a steps_key N >= 1 does here, "no" is steps_key
    0. TRL's default of 500 steps is not ours, so "steps" needs steps_key beside it, and "no" beside
    a steps_key >= 1 is a contradiction, not a choice of one. Without a ``steps_key`` (the pairs'
    evaluation runs only around training) "no" is what happens; other values get ``instead``."""
    def translate(given: dict[str, Any]) -> dict[str, Any]:
        if key not in given:
            return {}
        strategy = str(given[key]).strip().lower()  # YAML reads an unquoted no as false
        steps = given.get(steps_key) if steps_key else None
        try:
            every = float(steps) if steps is not None else None
        except (TypeError, ValueError):
            every = None  # not a number: steps_key's own check names the value
        if strategy in ("no", "false"):
            if every:
                raise ConfigError(f"{key} 'no' (never) and {steps_key} {steps} (every {steps} steps) contradict each "
                                  f"other; give {steps_key} 0 or leave out {key}")
            return {steps_key: 0} if steps_key else {}
        if strategy == "steps" and steps_key:
            if steps is None:  # read source by source: a count elsewhere may be a default, not a choice
                raise ConfigError(f"{key} 'steps' is read with {steps_key} N >= 1 given beside it, in the same file "
                                  f"or on the same command line (TRL's default of 500 is not ours): {instead}")
            if every == 0:
                raise ConfigError(f"{key} 'steps' needs {steps_key} N >= 1 beside it, got {steps_key} {steps}: "
                                  f"{instead}")
            return {}
        raise ConfigError(f"{key} {given[key]!r} (TRL's setting) has no counterpart of that meaning here: {instead}")
    return translate


def _checkpointing_kwargs(given: dict[str, Any]) -> dict[str, Any]:
    """TRL's gradient_checkpointing_kwargs: checkpointing here is always non-reentrant with torch's
    defaults (rlhf.build; for DPO and the reward model transformers 5's Trainer default, which TRL
    itself makes reentrant under DeepSpeed ZeRO-3 with PEFT, whatever was asked), so use_reentrant
    false, the open-r1 recipes' value, is what happens; any other setting would go unheard."""
    value = given["gradient_checkpointing_kwargs"]
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip().lower() not in ("", "none", "null") else {}
        except ValueError:
            raise ConfigError(f"gradient_checkpointing_kwargs expects a JSON object, got {value!r}") from None
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ConfigError(f"gradient_checkpointing_kwargs expects a mapping, got {value!r}")
    others = [name for name in value if name != "use_reentrant"]
    reentrant = str(value.get("use_reentrant", False)).strip().lower()
    if others or reentrant not in ("false", "0", "no"):
        shown = f"{others[0]} {value[others[0]]!r}" if others else f"use_reentrant {value['use_reentrant']!r}"
        raise ConfigError(f"gradient_checkpointing_kwargs {shown}: gradient checkpointing here is always torch's "
                          "non-reentrant checkpoint with its defaults; only use_reentrant false is read")
    return {}


# TRL names whose value sets our keys: (the TRL names read together, the translation).
_Translation = tuple[tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]]
_DTYPES: list[_Translation] = [(("dtype",), _dtype("dtype")), (("torch_dtype",), _dtype("torch_dtype"))]
_LORA_ALWAYS: _Translation = (("use_peft",), _fixed("use_peft", "true", ("false",), "training here is always LoRA (lora_r sets its rank)"))
_RL_TRANSLATIONS: list[_Translation] = [
    (("loss_type", "importance_sampling_level"), _loss),
    (("scale_rewards", "multi_objective_aggregation"), _scale_rewards),
    *_DTYPES,
    *(((name,), _loss_kwarg(name, ours)) for name, ours in _LOSS_KWARGS.items()),
    _LORA_ALWAYS,
    (("disable_dropout",), _fixed("disable_dropout", "true", ("false",), "RL training always switches dropout off: recomputed "
                                                           "logprobs must equal the rollout's")),
    (("vllm_importance_sampling_correction", "vllm_importance_sampling_mode"), _sampler_correction),
    (("save_strategy", "save_steps"), _strategy("save_strategy", "save_steps",
                                                "set save_steps N, a checkpoint every N RL steps (0 = only the final adapter)")),
    (("eval_strategy", "eval_steps"), _strategy("eval_strategy", "eval_steps",
                                                "set eval_steps N, an evaluation every N RL steps (0 = off)")),
    (("gradient_checkpointing_kwargs",), _checkpointing_kwargs),
]
_PAIRS_TRANSLATIONS: list[_Translation] = [
    *_DTYPES,
    (("save_strategy", "save_steps"), _strategy("save_strategy", "save_steps",
                                                "set save_steps N, a Trainer checkpoint every N optimizer steps (0 = none)")),
    (("eval_strategy",), _strategy("eval_strategy", None, "the held-out pairs (eval_dataset) are evaluated when "
                                                          "training ends (DPO: also before it), not during it")),
    (("gradient_checkpointing_kwargs",), _checkpointing_kwargs),
]
# Our own settings that a TRL name above is read beside (save_strategy with save_steps): not TRL names
_READ_BESIDE = {"save_steps", "eval_steps"}

# TRL booleans: a bare --flag means true
SWITCHES = {"use_peft", "disable_dropout", "vllm_importance_sampling_correction", "use_vllm", "sync_ref_model", "do_eval",
            "trust_remote_code", "load_in_4bit", "load_in_8bit"}

ALIASES: dict[str, tuple[dict[str, str], list[_Translation], dict[str, str]]] = {
    "RLConfig": (_RL_RENAMES, _RL_TRANSLATIONS, _RL_DIFFERENT),
    "EvalConfig": ({"dataset_name": "dataset", "dataset_test_split": "dataset_split",
                    "max_completion_length": "max_new_tokens", "environment": "environment_factory",
                    "dataset_prompt_column": "prompt_column"}, [], {}),
    "RewardModelConfig": (_PAIRS_RENAMES, _PAIRS_TRANSLATIONS, {}),
    "DPORunConfig": (_PAIRS_RENAMES, [*_PAIRS_TRANSLATIONS, _LORA_ALWAYS], {}),
}

# Names people bring from TRL's PPOConfig, verl and OpenRLHF: "did you mean" by meaning first.
SYNONYMS = {
    "kl_coef": ("kl_beta", "init_kl_coef", "kl_penalty_coef", "kl_ctl", "kl_loss_coef", "init_kl_coeff"),
    "kl_estimator": ("kl_penalty", "kl_loss_type", "kl_type"),
    "clip_range": ("cliprange", "clip_ratio", "clip_ratio_low", "eps_clip", "clip_eps", "clip_param"),
    "clip_range_high": ("clip_ratio_high", "eps_clip_high", "cliprange_high"),
    "value_clip_range": ("cliprange_value", "value_clip", "vf_clip"),
    "vf_coef": ("vf_coeff", "value_coef", "value_loss_coef"),
    "ppo_epochs": ("num_ppo_epochs", "ppo_epoch", "epochs", "update_epochs"),
    "max_new_tokens": ("response_length", "max_response_length", "max_tokens", "max_length", "max_gen_len",
                       "generate_max_len", "max_completion_tokens"),
    "learning_rate": ("lr", "actor_learning_rate", "actor_lr"),
    "rollout_batch_size": ("batch_size", "train_batch_size", "num_prompts", "prompts_per_step"),
    "mini_batch_size": ("ppo_mini_batch_size", "mini_batch", "minibatch_size", "train_mini_batch_size"),
    "num_generations": ("n_samples_per_prompt", "num_samples", "group_size", "rollout_n", "num_completions", "n_samples"),
    "max_steps": ("total_steps", "num_steps", "steps", "total_episodes", "num_episodes", "num_train_steps"),
    "lam": ("gae_lambda", "lambda", "lambd"),
    "gamma": ("discount", "discount_factor"),
    "advantage_estimator": ("adv_estimator", "estimator", "advantage"),
    "loss_agg_mode": ("loss_agg", "loss_aggregation"),
    "model_name_or_path": ("model", "model_name", "model_path", "base_model", "pretrain"),
    "report_to": ("log_with", "tracker", "logger"),
    "lora_r": ("lora_rank", "rank"),
    "normalize_rewards": ("whiten_rewards", "normalize_reward", "reward_normalization"),
    "reward_funcs": ("reward_model", "reward_model_path", "reward_fn", "reward_func", "reward_functions"),
}
_SYNONYM_OF = {alias: ours for ours, aliases in SYNONYMS.items() for alias in aliases}


def alias_names(cls_name: str) -> list[str]:
    """Every TRL name the class accepts on the command line (renamed or translated)."""
    renames, translations, _ = ALIASES.get(cls_name, ({}, [], {}))
    return [*renames, *(key for keys, _ in translations for key in keys if key not in _READ_BESIDE)]


def explained_names(cls_name: str) -> list[str]:
    """TRL's settings the class reads at some values or refuses with an explanation (``use_vllm``,
    ``trust_remote_code``, ``num_train_epochs``), so a command-line flag gets what a file's key gets."""
    return [*SAYS_WHAT_HAPPENS_HERE, *_MODEL_LOADING, *ALIASES.get(cls_name, ({}, [], {}))[2]]


def aliases_of(cls_name: str) -> dict[str, list[str]]:
    """our field -> the TRL names renamed to it (for --help)."""
    out: dict[str, list[str]] = {}
    for alias, ours in ALIASES.get(cls_name, ({}, [], {}))[0].items():
        out.setdefault(ours, []).append(alias)
    return out


def help_epilog(cls_name: str) -> str | None:
    _, translations, different = ALIASES.get(cls_name, ({}, [], {}))
    if not translations:
        return None
    names = ", ".join(key for keys, _ in translations for key in keys if key not in _READ_BESIDE)
    text = f"TRL names accepted too: {names}; those listed with a field above (TRL: ...) are the same setting."
    if different:
        text += f" Refused with the conversion to ours: {', '.join(different)}."
    return text


def translate(cls_name: str, fields: set[str], given: dict[str, Any], native: dict[str, Any],
              where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """One source's non-field keys -> (our key -> value, our key -> the TRL name it came from).

    ``native``: our keys the same source gives itself (parsed values); a TRL name for one of them is
    an error, as is an unknown key (with a 'did you mean' by meaning before spelling).
    """
    renames, translations, different = ALIASES.get(cls_name, ({}, [], {}))
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}

    def put(key: str, value: Any, alias: str) -> None:
        if isinstance(value, dict):  # a part of a kwargs mapping: merged into the rest of it
            clash = set(value) & set((native.get(key) or {}) if key in native else out.get(key, {}))
            if clash:
                raise ConfigError(f"{alias} (TRL's name) and {key} both set {key}.{sorted(clash)[0]} in {where}; keep one")
            out[key], origin[key] = {**out.get(key, {}), **value}, alias
            return
        if key in native or key in origin:
            if (native[key] if key in native else out[key]) == value:  # two names that agree (torch_dtype + bf16)
                return
            other = key if key in native else origin[key]
            raise ConfigError(f"{alias} (TRL's name) and {other} both set {key} in {where}; keep one")
        out[key], origin[key] = value, alias

    unknown = []
    for key in [k for k in given if k not in fields]:
        if says_what_happens_here(key, given[key]):
            continue  # TRL's setting at the value that says what happens here anyway (use_vllm: false)
        if key in renames and renames[key] in fields:
            put(renames[key], given[key], key)
        elif not any(key in keys for keys, _ in translations):
            unknown.append(key)
    if unknown:  # all of them at once: a TRL recipe can hold twenty, one refusal per run would be twenty runs
        raise ConfigError(unknown_keys_message(cls_name, fields, unknown, where, given))
    for keys, fn in translations:
        present = {key: given[key] for key in keys if key in given}
        if present:
            for our_key, value in fn(present).items():
                put(our_key, value, "/".join(present))
    return out, origin


def unknown_keys_message(cls_name: str, fields: set[str], keys: list[str], where: str,
                         given: dict[str, Any] | None = None) -> str:
    """Why each of ``keys`` is refused, in one line (``unknown_key_message`` for a single key); a TRL
    setting read at some values (``trust_remote_code: false``) is shown with the value ``given``."""
    if len(keys) == 1:
        return unknown_key_message(cls_name, fields, keys[0], where, given)
    reasons = []
    for key in keys:
        reason = _why_refused(cls_name, fields, key)[1]
        shown = f"{key}: {given[key]}" if given is not None and key in given and key in SAYS_WHAT_HAPPENS_HERE else key
        reasons.append(f"{shown} ({reason})" if reason else shown)
    return f"{len(keys)} config keys in {where} have no setting here: {', '.join(reasons)}; see --help for the valid keys"


def unknown_key_message(cls_name: str, fields: set[str], key: str, where: str,
                        given: dict[str, Any] | None = None) -> str:
    """Why ``key`` is refused, in one line naming ``where`` (and the value ``given`` for a TRL setting
    read at some values)."""
    kind, reason = _why_refused(cls_name, fields, key)
    if kind == "unknown":
        return f"unknown config key {key!r} in {where}; {reason or 'see --help for the valid keys'}"
    shown = f" {given[key]!r}" if given is not None and key in given and key in SAYS_WHAT_HAPPENS_HERE else ""
    owner = "open-r1's" if key in OPEN_R1_KEYS else "TRL's"
    joint = ": " if kind == "other meaning" else "; "
    return f"{key}{shown} ({owner} setting) in {where} has no counterpart of that meaning here{joint}{reason}"


def _why_refused(cls_name: str, fields: set[str], key: str) -> tuple[str, str | None]:
    """(kind, reason) for a key the class refuses: ("other meaning", the conversion to ours) for TRL's
    setting of another meaning; ("read at", which values are read) for one read at some values only;
    ("unknown", a 'did you mean' by meaning (SYNONYMS) before spelling, or None)."""
    import difflib

    different = {**_MODEL_LOADING, **ALIASES.get(cls_name, ({}, [], {}))[2]}
    if key in different or (key.startswith("vllm_") and "use_vllm" in different):
        return "other meaning", different.get(key, different.get("use_vllm"))
    if key in SAYS_WHAT_HAPPENS_HERE:  # read at some values, and this is not one of them
        return "read at", f"only {' / '.join(SAYS_WHAT_HAPPENS_HERE[key])} is read"
    accepted = [*fields, *alias_names(cls_name)]
    by_meaning = _SYNONYM_OF.get(key.lower())
    close = [by_meaning] if by_meaning in fields else sorted(
        (name for name in accepted if _misspelt(key, name)),
        key=lambda name: -difflib.SequenceMatcher(None, key.lower(), name.lower()).ratio())[:1]
    return "unknown", f"did you mean {close[0]!r}?" if close else None


def _misspelt(key: str, name: str) -> bool:
    """Whether ``key`` reads as a misspelling of ``name`` (kl_coeff, clip_rnage, learningrate), not as
    another setting that shares words with it (lr_scheduler_kwargs is not lr_scheduler_type, nor
    gradient_checkpointing_kwargs gradient_checkpointing): word by word alike, or alike as a whole."""
    import difflib

    def alike(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()

    words, name_words = key.split("_"), name.split("_")
    if len(words) == len(name_words) and all(alike(a, b) >= 0.6 for a, b in zip(words, name_words)):
        return alike(key, name) >= 0.8  # not fp16 for bf16, deepspeed for seed
    return alike(key, name) >= 0.9
