"""One dataclass config for every RL script: YAML defaults, CLI overrides, validation.

    python scripts/train_ppo.py --config configs/ppo.yaml --max_steps 10 --kl_coef 0.1

Precedence: dataclass default < the script's algorithm defaults < YAML file < CLI flags; the
settings that follow the estimator (``rlhf.defaults``) take the chosen estimator's defaults where
no file, flag or keyword gives them.
Unknown keys and impossible values raise ``ConfigError`` whose message says what to change.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from rlhf.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES
from rlhf.defaults import ALGORITHM_DEFAULTS, ESTIMATOR_SETTINGS, estimator_defaults  # noqa: F401 (public here too)
from rlhf.errors import ConfigError
# The parsing lives in rlhf.parsing; these names are this module's public API too.
from rlhf.parsing import OneLineParser, changed_settings, load_yaml, parse_dataclass, save_config  # noqa: F401
from rlhf.parsing import trl_fraction_hint

REPORT_TARGETS = ("none", "jsonl", "tensorboard", "wandb")
# id(config) -> the fields its constructor call named, from RLConfig.__new__ to its __post_init__
_GIVEN: dict[int, set[str]] = {}
# How the policy is updated (rlhf.update.UPDATERS, whose import needs transformers; a test keeps
# the two in step): first-order steps on the policy loss, or TRPO's natural-gradient step.
UPDATE_METHODS = ("optimizer", "trpo")
REWARD_ERROR_MODES = ("raise", "skip_batch", "zero")
REWARD_AGGREGATIONS = ("sum", "normalize_then_sum")  # rlhf.scoring.score
PROMPT_OVERFLOW_MODES = ("truncate", "error")
# rlhf.experience.IMPORTANCE_SAMPLING_MODES (whose import needs transformers; a test keeps the two in step)
IMPORTANCE_SAMPLING_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# transformers.SchedulerType values that get_scheduler builds from warm-up and total steps alone
# (importing transformers here would slow every config; a test keeps the list in step). The others
# need arguments this config does not pass (min_lr, num_decay_steps) or a metric (reduce_lr_on_plateau).
LR_SCHEDULER_TYPES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                      "polynomial", "inverse_sqrt")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding limits
# No model has this many positions; a larger max_prompt_length + max_new_tokens is a typo (1e9)
# that would otherwise allocate until memory runs out.
MAX_SEQUENCE_LENGTH = 1_000_000


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


FLOAT32_MAX = 3.4028234663852886e38
MAX_LEARNING_RATE = 10.0
MIN_TEMPERATURE = 1e-6



def check_learning_rate(learning_rate: float) -> None:
    """ConfigError unless 0 < learning_rate <= MAX_LEARNING_RATE (NaN fails too). Above ~1 Adam
    moves every LoRA weight by about the rate per step (and past 3e37 its step size overflows
    float32 inside torch); RL on LMs uses 1e-7..1e-3."""
    if not 0 < learning_rate <= MAX_LEARNING_RATE:
        raise ConfigError(f"learning_rate must be in (0, {MAX_LEARNING_RATE:g}], got {learning_rate:g}")


def check_seed(seed: Any) -> None:
    """ConfigError unless ``seed`` is an integer numpy and torch can seed with."""
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")

@dataclass
class RLConfig:
    """Every knob of an RL run. Field docs are the ``--help`` text."""

    # --- model
    model_name_or_path: str = _field(
        "smollm2-135m-instruct",
        "Policy base model: 'smollm2-135m-instruct' (embedded, no download), a local HF model dir, or a hub id.",
    )
    lora_r: int = _field(16, "LoRA rank.")
    lora_alpha: int = _field(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = _field(
        0.0, "LoRA dropout: ignored by RL training (with a warning), which switches every dropout off so that "
        "recomputed logprobs equal the rollout's; the saved adapter records 0. Accepted so that "
        "TRL/peft configs (lora_dropout 0.05) run unchanged."
    )
    lora_target_modules: list[str] = _field(["all-linear"], "Modules that get LoRA adapters; 'all-linear' = every linear layer but the LM head.")
    bf16: bool = _field(
        False, "Base model weights in bfloat16; LoRA, value head, optimizer state and loss math stay float32. "
        "Refused on GPUs without bf16 (pre-Ampere); on CPUs without avx512_bf16/AMX it works but is slow.",
    )
    gradient_checkpointing: bool = _field(
        False, "Recompute activations in the backward pass: less activation memory, one extra forward per micro-batch.",
    )
    share_prompt_prefix: bool = _field(
        True, "Rows with the same prompt (a GRPO/RLOO group) run the prompt once, in generation and in every "
        "forward, through a KV cache copied to each row; same result up to float rounding. Off by itself under "
        "DeepSpeed/FSDP, with gradient_checkpointing, and for hybrid models whose cache holds conv or recurrent "
        "state (LFM2, Qwen3.5, Qwen3-Next): each row then runs its own prompt.",
    )
    init_adapter: str | None = _field(
        None, "PEFT LoRA adapter dir (e.g. a DPO run's final/) merged into the base before RL; the merged model is then "
        "both the starting policy and the KL reference. final/ and checkpoints then hold init + RL LoRA as one "
        "adapter of the original base, with init_adapter/ (the reference) and rl_adapter/ next to it.",
    )

    # --- data
    dataset: str = _field(
        "builtin:prompts", "Prompt data: a .jsonl/.json/.csv/.parquet file, a dir of such files or one saved by "
        "datasets.save_to_disk, 'builtin:prompts', or a Hugging Face hub dataset id (e.g. trl-lib/tldr; TRL: "
        "dataset_name). The Python API also takes a datasets.Dataset.",
    )
    dataset_config: str | None = _field(None, "Configuration (subset) name of a hub dataset (TRL: dataset_config).")
    dataset_split: str = _field("train", "Split to train on when the dataset has several (built-in: train / eval; TRL: dataset_train_split).")
    prompt_column: str = _field("prompt", "Column holding the prompt: a string, or a list of chat messages {role, content}.")
    eval_dataset: str | None = _field(
        None, "Prompt data for periodic evaluation (same forms as dataset); default: eval_dataset_split of dataset.")
    eval_dataset_split: str | None = _field(
        None, "Split used for evaluation: of eval_dataset, or of dataset when eval_dataset is unset (TRL: "
        "dataset_test_split). Default: eval_dataset's dataset_split; for dataset itself 'eval' (built-in) or 'test'.",
    )
    max_prompt_length: int = _field(96, "Prompts longer than this many tokens are truncated from the left.")
    prompt_overflow: str = _field(
        "truncate", "Prompts over max_prompt_length: truncate (keep the end, warn with a count) or error (refuse the dataset).",
    )

    # --- generation
    max_new_tokens: int = _field(32, "Maximum response length in tokens.")
    temperature: float = _field(1.0, "Sampling temperature; logprobs are recomputed with the same temperature.")
    top_p: float = _field(1.0, "Nucleus sampling threshold (1.0 = off).")
    missing_eos_penalty: float | None = _field(None, "Subtract this from the score of responses cut off without EOS (None = off).")
    importance_sampling_correction: str = _field(
        "none", "Correct the policy loss for the sampler's distribution differing from the trainer's (merged LoRA, "
        "bfloat16, another engine) with the ratio rho = pi_old / pi_sampler of the sampler's own logprobs: "
        f"{', '.join(IMPORTANCE_SAMPLING_MODES)}. token_* = one ratio per token, sequence_* = one per response; "
        "*_truncate clips rho to [importance_sampling_min, importance_sampling_max] (TIS), *_mask zeroes the "
        "weight outside it (MIS / IcePop). Adds the old-logprob pass when the update would skip it. The mismatch "
        "is logged as sampler/kl, sampler/logprob_abs_diff_mean/_max whenever old logprobs are computed. TRL: "
        "vllm_importance_sampling_correction + vllm_importance_sampling_mode (TRL applies it with vLLM only; its "
        "default there is sequence_mask).",
    )
    importance_sampling_min: float | None = _field(
        None, "Lower bound C_min of the importance-sampling ratio (None = open; TRL: vllm_importance_sampling_clip_min).")
    importance_sampling_max: float | None = _field(
        3.0, "Upper bound C_max of the importance-sampling ratio (None = open; TRL: vllm_importance_sampling_clip_max, "
        "default 3.0).")

    # --- multi-turn episodes (rlhf.episodes): tools and environments, TRL's names
    tools: list[str] = _field(
        [], "Tools the model may call during its response: path/to/file.py:function or package.module:function "
        "(type hints + Google-style docstring; sync or async). The response becomes an episode: turns of the "
        "model, tool results between them; max_new_tokens bounds the whole episode (TRL's max_completion_length).",
    )
    environment_factory: str | dict[str, str] | None = _field(
        None, "An environment class (file.py:Class or module:Class) with reset(**row) -> str | None and public methods "
        "the model calls as tools, optionally get_reward() -> float (a reward source named after the class); one "
        "instance per episode. A YAML mapping {name: spec} picks the class by the dataset's 'environment' column. "
        "CLI: --environment.",
    )
    max_tool_calling_iterations: int | None = _field(
        None, "Turns whose tool calls are executed per episode (None = until max_new_tokens; TRL's name).")
    tool_timeout: float | None = _field(
        30.0, "Seconds a tool call may take; one that takes longer returns an error observation (None = no limit).")
    chat_template: str | None = _field(
        None, "Chat template to use instead of the tokenizer's (prompts and episodes), e.g. for a model whose own cannot "
        "render tool calls: a .jinja file, or the name of one of TRL's (qwen3 = trl/chat_templates/qwen3.jinja).",
    )
    chat_template_kwargs: dict[str, Any] = _field(
        {}, "Extra keywords for the chat template when rendering episodes (TRL's name; e.g. {enable_thinking: false}).")

    # --- reward
    reward_funcs: list[str] = _field(["sentiment"], "Reward functions: built-in names, path/to/file.py:function, or package.module:function.")
    reward_weights: list[float] | None = _field(None, "Weight of each reward function (default: all 1.0).")
    reward_aggregation: str = _field(
        "sum", "How several reward functions make one score: sum = the weighted sum of their values; "
        "normalize_then_sum = GDPO (arXiv 2601.05242): each function's values normalised within their group, "
        "(r - group mean) / (group std + 1e-4) with None left out, then weighted and summed (needs num_generations "
        ">= 2; logs advantages/<name>/mean and std; missing_eos_penalty and the overlong penalty are subtracted "
        "from that sum). The estimator then works on that score: TRL's "
        "multi_objective_aggregation normalize_then_sum is this with grpo's advantage_kwargs {scale_rewards: batch} "
        "(TRL: multi_objective_aggregation, sum_then_normalize = sum).",
    )
    reward_kwargs: dict[str, Any] = _field(
        {}, "Parameters per reward name, e.g. {length: {target: 40}} (YAML) or a JSON string on the CLI."
    )
    reward_clip: float | None = _field(None, "Clip combined rewards to [-reward_clip, reward_clip] (OpenRLHF uses 10).")
    reward_error: str = _field(
        "raise", "When a reward function fails (raises, returns None/NaN) on some samples: raise = stop with the "
        "failing sample; skip_batch = skip this step's update; zero = score the failed samples 0. Failures are "
        "counted as reward_errors in metrics.",
    )
    reward_timeout: float | None = _field(
        None, "Seconds one reward function may take on a batch (None = no limit). A call past it fails as "
        "reward_error says (raise: stop; skip_batch / zero: its samples count as failed); remote rewards have "
        "their own timeout in reward_kwargs.",
    )
    normalize_rewards: bool = _field(False, "Normalise combined rewards to mean 0, std 1 over each global batch.")

    # --- batch sizes and optimisation
    max_steps: int = _field(20, "Number of RL steps (one rollout + update each; TRL's max_steps counts optimizer steps).")
    rollout_batch_size: int = _field(16, "Prompts per step, across all processes.")
    num_generations: int = _field(1, "Responses sampled per prompt (>= 2 for group baselines).")
    mini_batch_size: int = _field(16, "Sequences per optimizer step (global); the rollout is split into such minibatches.")
    ppo_epochs: int = _field(1, "Passes over each rollout (TRL 4, OpenRLHF 1).")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per minibatch (mini_batch_size is split this many ways).")
    generation_batch_size: int | None = _field(
        None, "Sequences generated at once per process (default: the whole per-process rollout). Lower it to cap "
        "the KV cache's memory; results do not depend on it beyond float rounding. Not TRL's generation_batch_size, "
        "which counts the completions of one rollout: that is rollout_batch_size x num_generations here.",
    )
    logprob_batch_size: int | None = _field(
        None, "Sequences per no-grad forward (old/reference logprobs, values) per process (default: the training "
        "micro-batch). No activations are kept, so it can usually be larger than the micro-batch.",
    )
    chunked_logprobs_mb: float | None = _field(
        0.0, "When one forward's response logits (rows x response tokens x vocabulary, float32) would exceed this "
        "many MiB, logprobs come from the last hidden states through the LM head in row chunks: the full logits "
        "never exist (2.4 GB saved at 16 x 256 tokens, 49k vocabulary) and the LM head costs the same two products "
        "as the full path (measured faster at every size: 16 x 32 tokens of SmolLM2 0.60 -> 0.40 s forward and "
        "backward). 0 = always, None = never. Models whose logits are not the plain LM head of the last hidden "
        "state keep the full logits.",
    )
    learning_rate: float = _field(1e-4, "Adam learning rate of the LoRA weights (LoRA wants 1e-5 .. 5e-4).")
    value_learning_rate: float | None = _field(None, "Learning rate of the value head (default: learning_rate).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    lr_scheduler_type: str = _field("constant", "Scheduler from transformers.get_scheduler: constant, linear, cosine, ...")
    warmup_steps: int = _field(0, "Learning-rate warm-up in optimizer steps.")
    max_grad_norm: float | None = _field(1.0, "Clip the global gradient norm to this (None = no clipping).")
    max_consecutive_skips: int = _field(
        5, "An optimizer step with a non-finite loss, gradient or updated weights is skipped (counted as skipped_steps); after "
        "this many in a row the run stops with a checkpoint of the last good weights.",
    )
    seed: int = _field(42, "Random seed (sampling seeds differ per process).")

    # --- algorithm
    advantage_estimator: str = _field("gae", f"Advantage estimator: one of {', '.join(ADVANTAGE_ESTIMATORS)}.")
    policy_loss: str = _field("ppo_clip", f"Policy loss: one of {', '.join(POLICY_LOSSES)}.")
    policy_loss_kwargs: dict[str, Any] = _field(
        {}, "Hyperparameters of the policy loss beyond the flat keys, by the loss function's own parameter names, "
        "e.g. {epsilon_high: 5.0} for cispo (YAML, or a JSON string on the CLI); they override clip_range etc.",
    )
    advantage_kwargs: dict[str, Any] = _field(
        {}, "Hyperparameters of the advantage estimator by its parameter names, e.g. {eps: 1.0e-4} for grpo; "
        "they override gamma/lam.",
    )
    loss_agg_mode: str | None = _field(
        None, f"Loss aggregation: one of {', '.join(LOSS_AGG_MODES)} (seq-mean-token-sum-norm = Dr. GRPO, divides by "
        "max_new_tokens); none = the policy loss's own default (token-mean; gspo: seq-mean-token-mean). The value, "
        "KL and TRPO losses aggregate the same way.")
    clip_range: float | None = _field(
        None, "Ratio clip epsilon of the clipped losses (none = the loss's own default: ppo_clip 0.2, gspo 3e-4).")
    clip_range_high: float | None = _field(
        None, "Upper clip epsilon (DAPO clip-higher, e.g. 0.28; none = the loss's default: ppo_clip clip_range, gspo 4e-4).")
    dual_clip: float | None = _field(None, "Dual-clip constant c > 1 for negative advantages (None = off).")
    value_clip_range: float | None = _field(0.2, "Value clipping around the rollout's values (None = off).")
    vf_coef: float = _field(0.1, "Weight of the value loss.")
    gamma: float = _field(1.0, "Discount factor over response tokens.")
    lam: float = _field(0.95, "GAE lambda.")
    baseline_decay: float = _field(0.9, "Decay of the REINFORCE moving-average baseline.")
    whiten_advantages: bool = _field(True, "Normalise advantages to mean 0, std 1 over the rollout batch.")
    filter_zero_std_groups: bool = _field(
        False, "Drop groups whose num_generations rewards are all equal from the update (no signal; DAPO-style).",
    )
    dynamic_sampling: bool = _field(
        False, "DAPO dynamic sampling: sample further prompt batches until every process holds its share of "
        "rollout_batch_size groups whose rewards differ (at most dynamic_sampling_max_rounds batches; short batches are topped up with "
        "zero-spread groups that the update drops). Logged as dynamic_sampling/rounds and /missing_groups.",
    )
    dynamic_sampling_max_rounds: int = _field(4, "Most prompt batches sampled per step with dynamic_sampling (verl's max_num_gen_batches).")
    overlong_buffer_length: int = _field(
        0, "DAPO soft overlong punishment: responses in the last this many tokens before max_new_tokens lose "
        "overlong_penalty_factor * (length - (max_new_tokens - buffer)) / buffer from their score (0 = off).",
    )
    overlong_penalty_factor: float = _field(1.0, "Largest overlong penalty (at max_new_tokens).")
    mask_truncated_completions: bool = _field(
        False, "Responses cut at max_new_tokens without EOS are excluded from the loss (TRL's setting; DAPO).",
    )
    kl_coef: float = _field(0.05, "KL penalty coefficient beta (initial value when adaptive).")
    kl_estimator: str = _field("k1", "KL estimator: k1 (unbiased), k2, k3 (non-negative).")
    kl_in_reward: bool = _field(True, "Put -beta*KL into per-token rewards (PPO style); false = KL as a loss term (GRPO style).")
    adaptive_kl_target: float | None = _field(None, "Target KL per sequence in nats for the adaptive controller (None = fixed kl_coef).")
    adaptive_kl_horizon: float = _field(10000.0, "Horizon of the adaptive KL controller (Ziegler et al. 2019).")
    use_bias_correction_kl: bool = _field(
        False, "KL loss term (kl_in_reward false) x the differentiable importance ratio, the unbiased reverse-KL "
        "gradient of DeepSeek-V3.2 (TRL's setting, same meaning). TRL defaults to true; false here keeps the GRPO "
        "paper's k3 gradient that runs before this option trained with (set true to reproduce a TRL run with beta > 0).",
    )
    top_entropy_quantile: float = _field(
        1.0, "Train only the top this share of response tokens by entropy, over the micro-batch on all processes "
        "(Wang et al. 2025 'Beyond the 80/20 rule' recommend 0.2; 1.0 = every token; TRL's setting, same meaning). "
        "The loss still divides by every token.",
    )
    entropy_coef: float = _field(
        0.0, "Entropy bonus: loss - entropy_coef x mean token entropy of each micro-batch (whatever loss_agg_mode); "
        "the initial coefficient when use_adaptive_entropy (TRL's setting, same meaning).",
    )
    use_adaptive_entropy: bool = _field(
        False, "Skywork-OR1 adaptive entropy control: after each optimizer step entropy_coef moves by entropy_coef_delta "
        "(up while the step's mean entropy <= entropy_target, down otherwise) and applies only while entropy <= "
        "entropy_target; its state is checkpointed (TRL's setting).",
    )
    entropy_coef_min: float = _field(0.0, "Lowest entropy_coef of adaptive entropy control.")
    entropy_coef_max: float = _field(1.0, "Highest entropy_coef of adaptive entropy control.")
    entropy_coef_delta: float = _field(0.005, "Step of entropy_coef per optimizer step in adaptive entropy control.")
    entropy_target: float = _field(
        0.2, "Target mean token entropy (nats) of adaptive entropy control, over the trained tokens (TRL's default "
        "0.2 almost never engages: set it near the logged entropy early in training).",
    )
    off_policy_mask_threshold: float | None = _field(
        None, "Off-policy sequence masking (DeepSeek-V3.2 eq. 9): responses with a negative advantage whose mean "
        "log(pi_sampler / pi) exceeds this leave the loss (e.g. 0.5; none = off; TRL's setting, same meaning).",
    )

    # --- TRPO (update_method: trpo)
    update_method: str = _field(
        "optimizer", "Policy update: 'optimizer' (AdamW on policy_loss, ppo_epochs x minibatches) or 'trpo' "
        "(one natural-gradient step per rollout inside a KL trust region; the value head keeps AdamW).",
    )
    max_kl: float = _field(0.01, "TRPO trust region: largest allowed mean per-token KL(old || new) of one step.")
    cg_iters: int = _field(10, "TRPO conjugate-gradient iterations for the step direction F^-1 g.")
    cg_damping: float = _field(0.1, "TRPO damping added to the Fisher-vector product (F + damping I) v.")
    fisher_sample_fraction: float = _field(
        1.0, "TRPO: share of the rollout's sequences (evenly spaced) whose KL Hessian estimates the Fisher matrix; "
        "each CG iteration costs proportionally less (OpenAI baselines uses 0.2).",
    )
    line_search_backtracks: int = _field(10, "TRPO line search: step fractions 1, 1/2, ... tried at most.")
    line_search_accept_ratio: float = _field(0.1, "TRPO line search: accept when actual/expected improvement exceeds this.")

    # --- output, logging, checkpoints
    output_dir: str = _field("outputs/run", "Where config.yaml, metrics.jsonl, checkpoints/ and final/ go.")
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir of another run.")
    logging_steps: int = _field(1, "Log metrics every this many steps.")
    num_samples_to_log: int = _field(4, "Prompt/response rows written to samples.jsonl per logged step.")
    push_to_hub: bool = _field(False, "Upload final/ (adapter, tokenizer, model card) to the Hugging Face hub once the "
                                      "run has finished and saved it locally (TRL's name).")
    hub_model_id: str | None = _field(None, "Hub repo for push_to_hub, e.g. me/smollm2-ppo (default: the output_dir's name).")
    hub_private_repo: bool | None = _field(None, "Create the hub repo private (None: the hub's default).")
    report_to: list[str] = _field(["jsonl"], "Trackers besides metrics.jsonl: none, jsonl, tensorboard, wandb (WANDB_MODE=offline works).")
    project_name: str | None = _field(None, "W&B project (TRL: project); default $WANDB_PROJECT, else 'rlhf'. The W&B "
                                            "entity comes from $WANDB_ENTITY (or your W&B default).")
    run_name: str | None = _field(None, "Run name in W&B and TensorBoard (output_dir/tensorboard/<run_name>); default "
                                        "$WANDB_NAME, else the output_dir's name.")
    log_completions: bool = _field(True, "Completion tables in W&B (the 'completions' wandb.Table) and TensorBoard "
                                         "(text 'completions'): prompt, completion, each reward function's value, "
                                         "reward, advantage of every sample of the step (TRL's log_completions).")
    log_completions_steps: int | None = _field(None, "Log completion tables every this many steps (None = logging_steps).")
    save_steps: int = _field(0, "Save a checkpoint every this many steps (0 = only the final adapter).")
    save_total_limit: int | None = _field(2, "Keep at most this many checkpoints (newest kept).")
    eval_steps: int = _field(0, "Evaluate on eval_dataset every this many steps (0 = off).")
    eval_num_prompts: int = _field(32, "Prompts used per evaluation.")
    resume_from_checkpoint: str | None = _field(None, "Checkpoint dir to resume from, or 'latest' (newest in "
                                                      "output_dir/checkpoints; TRL's true means it too).")

    def __new__(cls, *args: Any, **kwargs: Any) -> RLConfig:
        # the keywords a user wrote (RLConfig(...), a subclass): __post_init__ fills the settings that
        # follow the estimator where they are missing; the parsers and dataclasses.replace name every field
        config = super().__new__(cls)
        if args or kwargs:  # RLConfig() is PPO's defaults as they stand; copy and pickle call __new__ bare
            _GIVEN[id(config)] = set(kwargs) | {f.name for f in dataclasses.fields(cls)[:len(args)]}
        return config

    def __post_init__(self) -> None:
        given = _GIVEN.pop(id(self), None)
        if given is not None and not set(ESTIMATOR_SETTINGS) <= given:
            values = {key: getattr(self, key) for key in ("advantage_estimator", *ESTIMATOR_SETTINGS)}
            RLConfig.complete_settings(values, given)
            for key in ESTIMATOR_SETTINGS:
                setattr(self, key, values[key])
        # TRL's resume_from_checkpoint=True (YAML true, --resume_from_checkpoint true) is the newest checkpoint
        if self.resume_from_checkpoint is True or (self.resume_from_checkpoint in ("true", "True")
                                                  and not os.path.exists(self.resume_from_checkpoint)):
            self.resume_from_checkpoint = "latest"
        elif self.resume_from_checkpoint is False or self.resume_from_checkpoint in ("false", "False", ""):
            self.resume_from_checkpoint = None
        self.validate()

    # Rules are grouped by what they protect; each message names the key to change.
    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        self._check_finite_numbers()
        for name in ("max_steps", "rollout_batch_size", "num_generations", "mini_batch_size", "ppo_epochs",
                     "gradient_accumulation_steps", "max_new_tokens", "max_prompt_length", "lora_r",
                     "logging_steps", "eval_num_prompts", "max_consecutive_skips"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}"
                    + (" (TRL's -1, train for num_train_epochs, has no counterpart: RL runs count steps; set max_steps = "
                       "num_train_epochs x prompts in the dataset / rollout_batch_size)"
                       if name == "max_steps" and getattr(self, name) == -1 else ""))
        for name in ("generation_batch_size", "logprob_batch_size", "log_completions_steps"):
            require(getattr(self, name) is None or getattr(self, name) >= 1,
                    f"{name} must be >= 1 or none (= automatic), got {getattr(self, name)}")
        for name in ("save_steps", "eval_steps", "warmup_steps", "num_samples_to_log"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(self.chunked_logprobs_mb is None or self.chunked_logprobs_mb >= 0,
                f"chunked_logprobs_mb must be >= 0 (0 = always chunk) or none (= never), got {self.chunked_logprobs_mb}")
        check_learning_rate(self.learning_rate)
        require(self.value_learning_rate is None or 0 < self.value_learning_rate <= MAX_LEARNING_RATE,
                f"value_learning_rate must be in (0, {MAX_LEARNING_RATE:g}]")
        # logits / temperature: below this float32 loses the value (1e-46 is 0) or the logits overflow
        require(self.temperature >= MIN_TEMPERATURE,
                f"temperature must be >= {MIN_TEMPERATURE:g} (use a small one such as 0.01 for near-greedy "
                f"sampling), got {self.temperature:g}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check_seed(self.seed)
        require(self.lr_scheduler_type in LR_SCHEDULER_TYPES,
                f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of: {', '.join(LR_SCHEDULER_TYPES)}")
        require(self.max_prompt_length + self.max_new_tokens <= MAX_SEQUENCE_LENGTH,
                f"max_prompt_length + max_new_tokens = {self.max_prompt_length + self.max_new_tokens} tokens exceeds "
                f"{MAX_SEQUENCE_LENGTH:,}; set --max_new_tokens to what the model can hold (e.g. 256)")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        correction = self.importance_sampling_correction
        low, high = self.importance_sampling_min, self.importance_sampling_max
        require(correction in IMPORTANCE_SAMPLING_MODES, f"importance_sampling_correction {correction!r} is not one of: "
                f"{', '.join(IMPORTANCE_SAMPLING_MODES)}")
        require(low is None or low >= 0,
                f"importance_sampling_min must be >= 0 (a ratio of probabilities) or none, got {low}")
        require(high is None or high > 0, f"importance_sampling_max must be > 0 (TRL's default 3.0) or none, got {high}")
        require(low is None or high is None or low < high,
                f"importance_sampling_min ({low}) must be less than importance_sampling_max ({high})")
        require(not correction.endswith("_truncate") or low is not None or high is not None,
                f"importance_sampling_correction {correction} clips the ratio: set importance_sampling_min or "
                "importance_sampling_max")
        require(correction == "none" or self.update_method != "trpo",
                "importance_sampling_correction weights the policy loss of update_method optimizer; TRPO's "
                "natural-gradient step has no per-token weight: set importance_sampling_correction none")
        require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.clip_range is None or self.clip_range > 0, f"clip_range must be > 0 (typical 0.2), got {self.clip_range}")
        require(self.clip_range_high is None or self.clip_range_high > 0, "clip_range_high must be > 0 (e.g. 0.28)")
        require(self.dual_clip is None or self.dual_clip > 1, f"dual_clip must be > 1 (e.g. 3.0), got {self.dual_clip}")
        require(self.value_clip_range is None or self.value_clip_range > 0, "value_clip_range must be > 0 or none")
        require(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}")
        require(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        require(0 <= self.baseline_decay < 1, f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        require(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or none")
        require(self.adaptive_kl_target is None or self.adaptive_kl_target > 0, "adaptive_kl_target must be > 0 or none")
        require(self.adaptive_kl_horizon > 0, "adaptive_kl_horizon must be > 0")
        require(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1 or none")
        require(self.max_kl > 0, f"max_kl must be > 0 (typical 0.01), got {self.max_kl}")
        require(self.cg_iters >= 1, f"cg_iters must be >= 1, got {self.cg_iters}")
        require(0 < self.fisher_sample_fraction <= 1,
                f"fisher_sample_fraction must be in (0, 1], got {self.fisher_sample_fraction}")
        require(self.cg_damping >= 0, f"cg_damping must be >= 0, got {self.cg_damping}")
        require(self.line_search_backtracks >= 1, f"line_search_backtracks must be >= 1, got {self.line_search_backtracks}")
        require(0 <= self.line_search_accept_ratio < 1, "line_search_accept_ratio must be in [0, 1)")

        for key, value, valid in (
            ("advantage_estimator", self.advantage_estimator, tuple(ADVANTAGE_ESTIMATORS)),
            ("policy_loss", self.policy_loss, tuple(POLICY_LOSSES)),
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            ("update_method", self.update_method, UPDATE_METHODS),
            ("reward_error", self.reward_error, REWARD_ERROR_MODES),
            ("reward_aggregation", self.reward_aggregation, REWARD_AGGREGATIONS),
            ("prompt_overflow", self.prompt_overflow, PROMPT_OVERFLOW_MODES),
        ):
            require(value in valid, f"{key} {value!r} is not one of: {', '.join(valid)}")
        require(self.loss_agg_mode is None or self.loss_agg_mode in LOSS_AGG_MODES,
                f"loss_agg_mode {self.loss_agg_mode!r} is not one of: {', '.join(LOSS_AGG_MODES)} (or none)")
        for target in self.report_to:
            require(target in REPORT_TARGETS, f"report_to {target!r} is not one of: {', '.join(REPORT_TARGETS)}")

        require(self.reward_clip is None or self.reward_clip > 0, "reward_clip must be > 0 or none")
        require(self.reward_timeout is None or self.reward_timeout > 0, "reward_timeout must be > 0 seconds or none")
        require(all(isinstance(v, dict) for v in self.reward_kwargs.values()),
                "reward_kwargs maps reward names to mappings of parameters, e.g. {length: {target: 40}}")
        # An empty reward_funcs is checked by the trainer: an environment_factory given to it may pay.
        require(self.reward_aggregation != "normalize_then_sum" or self.num_generations >= 2,
                "reward_aggregation normalize_then_sum normalises each reward function within the samples of one "
                "prompt: set num_generations >= 2")
        for entry in self.reward_funcs:
            require(isinstance(entry, str) or callable(entry),
                    f"reward_funcs entries are names, paths, URLs or Python callables, got {type(entry).__name__}")
        require(isinstance(self.dataset, str) or hasattr(self.dataset, "column_names"),
                f"dataset must be a path, a hub id, builtin:<name> or a datasets.Dataset, got {type(self.dataset).__name__}")
        # The count is checked where the functions are final (RLTrainer, whose
        # reward_funcs may replace these, as TRL's GRPOConfig takes weights for the trainer's functions).
        estimator = ADVANTAGE_ESTIMATORS[self.advantage_estimator]
        if estimator.needs["groups"]:
            require(
                self.num_generations >= 2,
                f"advantage_estimator {self.advantage_estimator} compares samples of one prompt: set num_generations >= 2",
            )
        self._check_algorithm_settings()
        self._check_loss_options()
        self._check_episode_options()
        require(not self.filter_zero_std_groups or self.num_generations >= 2,
                "filter_zero_std_groups needs groups: set num_generations >= 2")
        require(not self.dynamic_sampling or self.num_generations >= 2,
                "dynamic_sampling keeps groups whose rewards differ: set num_generations >= 2")
        require(self.dynamic_sampling_max_rounds >= 1,
                f"dynamic_sampling_max_rounds must be >= 1, got {self.dynamic_sampling_max_rounds}")
        require(0 <= self.overlong_buffer_length < self.max_new_tokens,
                f"overlong_buffer_length must be in [0, max_new_tokens={self.max_new_tokens}), "
                f"got {self.overlong_buffer_length}")
        require(self.overlong_penalty_factor >= 0, f"overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}")

        rollout_sequences = self.rollout_batch_size * self.num_generations
        require(
            rollout_sequences % self.mini_batch_size == 0,
            f"mini_batch_size {self.mini_batch_size} must divide rollout_batch_size*num_generations = {rollout_sequences}; "
            f"e.g. --mini_batch_size {rollout_sequences}",
        )
        require(
            self.mini_batch_size % self.gradient_accumulation_steps == 0,
            f"gradient_accumulation_steps {self.gradient_accumulation_steps} must divide mini_batch_size {self.mini_batch_size}",
        )

    def _check_finite_numbers(self) -> None:
        """Every number setting a number (an int one an integer: 3.0 becomes 3, 0.5 is refused), set
        where it is not optional, and finite, as is every number in reward_weights: .inf / .nan parse as
        floats but train nothing useful (or nothing at all)."""
        self.reward_weights = reward_weights_list(self.reward_weights)
        numeric = ("float", "float | None", "int", "int | None")
        for f in dataclasses.fields(self):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            value = getattr(self, f.name)
            if kind in numeric and (isinstance(value, (str, bytes)) or (value is None and kind in ("float", "int"))):
                raise ConfigError(f"{f.name} expects {kind.split(' ')[0]}, got {value!r}")
            if kind in numeric and value is not None:
                values = [value]
            elif kind in ("list[float] | None", "list[float]") and isinstance(value, (list, tuple)):
                values = list(value)
            else:
                continue
            for item in values:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{f.name} must be a finite number, got {item}")
                if kind.startswith("int") and isinstance(item, float) and item.is_integer():
                    setattr(self, f.name, int(item))  # 3.0 steps are 3, as a YAML file's 3.0 reads
                elif kind.startswith("int") and (isinstance(item, bool) or not isinstance(item, numbers.Integral)):
                    # RLConfig(save_steps=0.5): TRL's fraction of the run; a step count here
                    raise ConfigError(f"{f.name} expects int, got {item!r}{trl_fraction_hint(f.name, item)}")
                # The tensors these reach are float32: a larger value overflows inside torch (a traceback)
                if isinstance(item, float) and abs(item) > FLOAT32_MAX:
                    raise ConfigError(f"{f.name} must be a finite number within float32 range (|x| <= 3.4e38), "
                                      f"got {item:g}")

    @staticmethod
    def _check_finite_kwargs(setting: str, kwargs: dict[str, Any]) -> None:
        def walk(key: str, value: Any) -> None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{setting} {key} must be a finite number, got {value}")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > FLOAT32_MAX:
                raise ConfigError(f"{setting} {key} must be within float32 range (|x| <= 3.4e38), got {value:g}")
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{key}.{k}", v)
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(f"{key}[{i}]", v)

        for key, value in kwargs.items():
            walk(str(key), value)

    def _check_algorithm_settings(self) -> None:
        """policy_loss_kwargs / advantage_kwargs: names the function has, and values it accepts (one
        call on a 1 x 2 dummy batch, so a refused value stops the run now, not mid-training)."""
        import torch  # rlhf.algorithms has imported it already

        zeros, ones = torch.zeros(1, 2), torch.ones(1, 2)
        probes = (  # offered exactly what the trainer offers (policy_loss_settings, advantage_settings)
            ("policy_loss_kwargs", POLICY_LOSSES[self.policy_loss], lambda entry: entry(
                zeros, zeros, zeros, ones, **self.policy_loss_settings())),
            ("advantage_kwargs", ADVANTAGE_ESTIMATORS[self.advantage_estimator], lambda entry: entry(
                zeros, ones, values=zeros, group_ids=torch.zeros(1, dtype=torch.long), baseline=0.0,
                **self.advantage_settings())),
        )
        for setting, entry, probe in probes:
            kwargs = entry.coerce_kwargs(getattr(self, setting))
            setattr(self, setting, kwargs)
            self._check_finite_kwargs(setting, kwargs)
            try:
                entry.check_kwargs(kwargs, setting)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if not kwargs:
                continue
            try:
                probe(entry)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{setting} {json.dumps(kwargs, default=str)}: {entry.kind} {entry.name!r} refuses them ({exc})") from None

    @property
    def episodes(self) -> bool:
        """Responses are multi-turn episodes (tools or an environment; rlhf.episodes)."""
        return bool(self.tools) or self.environment_factory is not None

    def _check_episode_options(self) -> None:
        """Tools and environments: their settings' ranges (the specs themselves load in the trainer)."""
        check_episode_limits(self.max_tool_calling_iterations, self.tool_timeout)
        if self.environment_factory == {}:
            raise ConfigError("environment_factory: an empty mapping names no environment")

    def _check_loss_options(self) -> None:
        """Entropy and token-selection settings (TRL's names): their ranges, and a policy loss that
        takes what they need (the registry passes a loss only the inputs it declares)."""
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        require(0.0 <= self.top_entropy_quantile <= 1.0,
                f"top_entropy_quantile must be in [0, 1] (1 = every token; paper 0.2), got {self.top_entropy_quantile}")
        require(self.off_policy_mask_threshold is None or self.off_policy_mask_threshold >= 0,
                f"off_policy_mask_threshold must be >= 0 (e.g. 0.5) or none, got {self.off_policy_mask_threshold}")
        require(self.entropy_coef_delta >= 0, f"entropy_coef_delta must be >= 0, got {self.entropy_coef_delta}")
        require(self.entropy_coef_min <= self.entropy_coef_max,
                f"entropy_coef_min {self.entropy_coef_min} must be <= entropy_coef_max {self.entropy_coef_max}")
        require(not self.use_adaptive_entropy or self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max,
                f"use_adaptive_entropy: entropy_coef {self.entropy_coef} must lie in [entropy_coef_min, entropy_coef_max] "
                f"= [{self.entropy_coef_min}, {self.entropy_coef_max}]")
        entry = POLICY_LOSSES[self.policy_loss]
        options = [name for name, on in (("top_entropy_quantile", self.top_entropy_quantile < 1.0),
                                          ("off_policy_mask_threshold", self.off_policy_mask_threshold is not None))
                   if on]
        if self.update_method != "optimizer":
            options += [name for name, on in (("entropy_coef", self.entropy_coef != 0.0),
                                              ("use_adaptive_entropy", self.use_adaptive_entropy)) if on]
            require(not options, f"{', '.join(options)} act on the optimizer's loss; update_method "
                                 f"{self.update_method} does not use them")
            require(self.aggregation != "micro-batch-token-mean",
                    "loss_agg_mode micro-batch-token-mean (TRL's bnpo) needs update_method optimizer")
        require(not options or "token_weights" in entry.fn_defaults,
                f"{', '.join(options)} need a policy loss that takes token_weights; policy_loss {self.policy_loss} does not")
        # TRL 1.16 GRPOTrainer: VESPO folds token-level importance weights into its sequence weight
        correction = getattr(self, "importance_sampling_correction", "none")
        require("is_weights" not in entry.fn_defaults or correction in ("none", "token_truncate", "token_mask"),
                f"policy_loss {self.policy_loss} needs a token-level importance_sampling_correction (token_truncate "
                f"or token_mask), got {correction}")

    def policy_loss_settings(self) -> dict[str, Any]:
        """What the policy loss is offered besides tensors. Flat settings left at none give way to
        the loss's own defaults; policy_loss_kwargs win over both."""
        flat = {"clip_range": self.clip_range, "clip_range_high": self.clip_range_high, "dual_clip": self.dual_clip}
        return {**{k: v for k, v in flat.items() if v is not None}, "loss_agg_mode": self.aggregation,
                "norm_length": self.max_new_tokens, **self.policy_loss_kwargs}

    def advantage_settings(self) -> dict[str, Any]:
        """The estimator's hyperparameters besides its tensors: gamma, lam, then advantage_kwargs."""
        return {"gamma": self.gamma, "lam": self.lam, **self.advantage_kwargs}

    @property
    def aggregation(self) -> str:
        """loss_agg_mode, or the policy loss's own default for it when unset."""
        if self.loss_agg_mode is not None:
            return self.loss_agg_mode
        return POLICY_LOSSES[self.policy_loss].fn_defaults.get("loss_agg_mode", "token-mean")

    @property
    def needs_value_head(self) -> bool:
        """Derived: a critic is trained only for estimators that read values (registry metadata)."""
        return ADVANTAGE_ESTIMATORS[self.advantage_estimator].needs["values"]

    def check_world_size(self, num_processes: int) -> None:
        """Batch sizes are global; each process must get whole groups and whole micro-batches."""
        if self.rollout_batch_size % num_processes:
            suggestion = -(-self.rollout_batch_size // num_processes) * num_processes
            raise ConfigError(
                f"rollout_batch_size {self.rollout_batch_size} prompts (x num_generations {self.num_generations} "
                f"samples each) cannot be split into whole groups over {num_processes} processes; set "
                f"--rollout_batch_size to a multiple of {num_processes} (e.g. {suggestion}) or change --num_processes"
            )
        if self.mini_batch_size % (num_processes * self.gradient_accumulation_steps):
            raise ConfigError(
                f"mini_batch_size {self.mini_batch_size} must be divisible by processes x gradient_accumulation_steps "
                f"= {num_processes * self.gradient_accumulation_steps}"
            )

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "RLConfig":
        """A config from keyword settings in which TRL's GRPOConfig names may stand for ours, e.g.
        ``RLConfig.from_dict({"max_completion_length": 64, "beta": 0.0, "loss_type": "dapo"})``;
        settings of another meaning are refused with the conversion (ConfigError). Read as a
        GRPOConfig is: GRPO unless advantage_estimator says otherwise, with that algorithm's
        defaults where the settings say nothing (as train_grpo.py reads a --config file)."""
        from rlhf.parsing import dataclass_from_dict

        return dataclass_from_dict(cls, settings, "RLConfig.from_dict", default_estimator="grpo")

    @staticmethod
    def complete_settings(values: dict[str, Any], given: set[str], default_estimator: str | None = None) -> None:
        """The settings of ESTIMATOR_SETTINGS that nobody gave (``given``: the user's keys, from a
        config file, flags or keywords) follow the chosen estimator (``estimator_defaults``): an
        RLConfig with advantage_estimator grpo trains GRPO as train_grpo.py does (KL as a k3 loss
        term, no batch whitening), not PPO's KL-in-reward. ``values``: every field, updated in place."""
        if default_estimator is not None and "advantage_estimator" not in given:
            values["advantage_estimator"] = default_estimator
        estimator = values["advantage_estimator"]
        chosen = estimator_defaults(estimator) if isinstance(estimator, str) else {}  # else refused by validate
        fields = {f.name: f.default for f in dataclasses.fields(RLConfig)}
        for key in ESTIMATOR_SETTINGS:
            if key not in given:
                values[key] = chosen.get(key, fields[key])

    def check_reward_weights(self) -> None:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values but reward_funcs has "
                              f"{len(self.reward_funcs)}; give one weight per function")

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain data (what config.yaml holds): a Python reward function becomes
        'python:module.name', a Dataset object '<Dataset N rows>'."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "column_names"):  # a datasets.Dataset given through the API
        return f"<{type(value).__name__} {getattr(value, 'num_rows', '?')} rows>"
    if callable(value):
        inner = getattr(value, "func", value)  # functools.partial
        name = getattr(inner, "__qualname__", None) or type(inner).__name__
        return f"python:{getattr(inner, '__module__', None) or type(inner).__module__}.{name}"
    return copy.deepcopy(value)


def check_episode_limits(max_tool_calling_iterations: int | None, tool_timeout: float | None) -> None:
    """The ranges of the episode limits (training, evaluation and rlhf.episodes.ToolEpisodes)."""
    if max_tool_calling_iterations is not None and max_tool_calling_iterations < 0:
        raise ConfigError(f"max_tool_calling_iterations must be >= 0 or none, got {max_tool_calling_iterations}")
    if tool_timeout is not None and not tool_timeout > 0:
        raise ConfigError(f"tool_timeout must be > 0 seconds or none, got {tool_timeout}")


def with_overrides(config: RLConfig, *, model: Any = None, reward_funcs: Any = None, train_dataset: Any = None,
                   tools: Any = None, environment_factory: Any = None, peft_config: Any = None) -> RLConfig:
    """A copy of ``config`` with what the Python API (RLTrainer's keywords) gives instead: a model
    name or loaded model (its name_or_path is recorded), reward functions, a training dataset,
    tools (functions or specs), an environment factory (a class, a callable, a spec, or a dict)
    and a peft LoraConfig (its rank, alpha, dropout and target modules)."""
    changes: dict[str, Any] = lora_settings(peft_config) if peft_config is not None else {}
    if tools is not None:
        changes["tools"] = list(tools) if isinstance(tools, (list, tuple)) else [tools]
    if environment_factory is not None:
        changes["environment_factory"] = environment_factory
    if model is not None:
        if isinstance(model, str):
            changes["model_name_or_path"] = model
        else:
            if hasattr(model, "peft_config"):
                raise ConfigError("model is a PEFT model: pass its base model and the adapter dir as init_adapter "
                                  "(or merge_and_unload() it first)")
            if not hasattr(model, "generate") or not hasattr(model, "config"):
                raise ConfigError(f"model must be a hub id, a local dir or a transformers PreTrainedModel, got "
                                  f"{type(model).__name__}")
            changes["model_name_or_path"] = getattr(model, "name_or_path", "") or type(model).__name__
    if reward_funcs is not None:
        changes["reward_funcs"] = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if train_dataset is not None:
        changes["dataset"] = train_dataset
    return dataclasses.replace(config, **changes) if changes else config


# LoraConfig fields lora_settings reads, or that say nothing about the adapter's weights (peft fills
# fan_in_fan_out for GPT-2's Conv1D layers itself; task_type, inference_mode and the names are records)
LORA_CONFIG_READ = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "inference_mode",
                    "base_model_name_or_path", "revision", "peft_type", "auto_mapping", "fan_in_fan_out")


def lora_settings(peft_config: Any) -> dict[str, Any]:
    """TRL's ``peft_config`` (a peft LoraConfig) as this config's LoRA settings. What the LoRA
    trained here cannot be (DoRA, rsLoRA, trained biases, saved full modules, per-layer ranks or
    alphas, other initialisations) is refused in one line rather than dropped."""
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config must be a peft LoraConfig (the adapters trained here are LoRA), got "
                          f"{type(peft_config).__name__}")
    # every other field at peft's default: what this LoRA does not read is refused, not dropped
    # (exclude_modules, lora_bias, layer_replication and the fields of later peft versions too)
    plain = LoraConfig()
    unsupported = [f"{f.name}={getattr(peft_config, f.name)!r}" for f in dataclasses.fields(LoraConfig)
                   if f.name not in LORA_CONFIG_READ and getattr(peft_config, f.name) != getattr(plain, f.name)]
    if unsupported:
        raise ConfigError(f"peft_config sets {', '.join(unsupported)}, which the LoRA trained here does not take; "
                          "leave them at peft's defaults (lora_r, lora_alpha, lora_target_modules are what it reads)")
    targets = peft_config.target_modules
    if targets is None or (isinstance(targets, str) and targets != "all-linear"):
        raise ConfigError(f"peft_config.target_modules is {targets!r}: name the modules (e.g. ['q_proj', 'v_proj']) "
                          "or give 'all-linear'; peft's per-architecture default and regular expressions are not read here")
    return {"lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha, "lora_dropout": peft_config.lora_dropout,
            "lora_target_modules": ["all-linear"] if targets == "all-linear" else sorted(targets)}


def reward_weights_list(weights: Any) -> list[Any] | None:
    """``reward_weights`` as a list: a tuple, a numpy array or a tensor of weights (TRL's trainer takes
    whatever torch.tensor reads) becomes a list of Python numbers, numpy's scalars floats; a lone
    number, a name, a 2-d array or a weight that is no finite number in float32's range (the
    rewards it scales are float32) is refused (ConfigError). RLConfig and evaluate() read them so."""
    if weights is None:
        return None
    if not isinstance(weights, list):
        if hasattr(weights, "tolist") and getattr(weights, "ndim", None) == 1:
            weights = weights.tolist()
        if not isinstance(weights, (list, tuple)):
            shape = getattr(weights, "shape", None)
            # an array's repr runs over several lines
            given = f"an array of shape {tuple(shape)}" if shape is not None and len(shape) > 1 else repr(weights)
            raise ConfigError(f"reward_weights expects a list of numbers (one per reward function), got {given}")
    listed = [float(w) if isinstance(w, numbers.Real) and not isinstance(w, bool) and type(w) not in (int, float) else w
              for w in weights]
    for weight in listed:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not abs(weight) <= FLOAT32_MAX:
            raise ConfigError(f"reward_weights must be finite numbers within float32 range (|x| <= 3.4e38), "
                              f"got {weight!r}")
    return listed


def parse_config(argv: list[str] | None = None, script_defaults: dict[str, Any] | None = None,
                 prog: str | None = None, description: str | None = None, cls: type = RLConfig) -> Any:
    """CLI + YAML -> a validated ``cls`` (RLConfig by default). Raises ConfigError (one line)."""
    return parse_dataclass(cls, argv, script_defaults, prog, description)
