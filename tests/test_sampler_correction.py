"""The sampler's own logprobs, the sampler-vs-trainer mismatch metrics and the importance-sampling
correction against the sampler (TRL's vllm_importance_sampling_*), on tensors and the tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_one_line_error, tiny_args
from rlhf import config as config_module
from rlhf import experience
from rlhf.algorithms import ADVANTAGE_ESTIMATORS
from rlhf.config import RLConfig, parse_config
from rlhf.distributed import Reducer
from rlhf.errors import ConfigError
from rlhf.experience import (importance_sampling_metrics, importance_sampling_weights, plan_passes,
                             sampler_mismatch_metrics, sampler_mismatch_totals)
from rlhf.models import PolicyWithValue, add_lora, load_base_model, load_tokenizer, merged_lora_weights
from rlhf.rollout import concat_rollouts, forward_response, generate_rollout, sample_responses
from rlhf.update import UPDATERS
from test_train_e2e import read_metrics

MODES = experience.IMPORTANCE_SAMPLING_MODES[1:]
PROMPTS = ["Hi there", "Write a poem about the sea", "What is 2+2?", "Tell me a story about a cat"]


def one_process() -> Reducer:
    """A Reducer over one process (its collectives return their input)."""
    return Reducer(SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda t, reduction: t))


# ---------------------------------------------------------------------------- the sampler's logprobs


class FixedLogits(torch.nn.Module):
    """Every position predicts the same 5 logits."""

    logits = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0])

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, **kwargs):
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, length, 5), cache=cache)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6)])
def test_sampler_logprobs_are_those_of_the_distribution_drawn_from(temperature, top_p):
    """log of the temperature-scaled, nucleus-renormalised probability of each drawn token; 0 after EOS."""
    torch.manual_seed(0)
    ids = torch.ones(64, 3, dtype=torch.long)
    tokens, logprobs = sample_responses(FixedLogits(), ids, torch.ones_like(ids), max_new_tokens=4,
                                        temperature=temperature, top_p=top_p, eos_token_ids=4, pad_token_id=98)
    probs = torch.softmax(FixedLogits.logits / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) <= top_p
    drawn_from = torch.zeros(5).scatter(0, order, sorted_probs * keep)
    drawn_from = drawn_from / drawn_from.sum()
    assert logprobs.shape == tokens.shape and logprobs.dtype == torch.float32
    ended = torch.cumsum((tokens == 4).long(), 1) - (tokens == 4).long() > 0  # after the first EOS
    assert (tokens[ended] == 98).all() and (logprobs[ended] == 0).all()
    real = ~ended
    assert torch.allclose(logprobs[real], drawn_from.log()[tokens[real]], atol=1e-6)
    if top_p < 1.0:  # the renormalisation is in: the kept tokens' logprobs exceed the full softmax's
        assert (logprobs[real] > probs.log()[tokens[real]] + 0.1).all()


def test_greedy_picks_have_logprob_zero():
    ids = torch.ones(3, 2, dtype=torch.long)
    tokens, logprobs = sample_responses(FixedLogits(), ids, torch.ones_like(ids), max_new_tokens=3, temperature=0.0,
                                        top_p=1.0, eos_token_ids=99, pad_token_id=98)
    assert tokens.tolist() == [[3] * 3] * 3 and logprobs.tolist() == [[0.0] * 3] * 3


def sample_tiny(model_dir, generate_path=False, bf16=False, top_p=1.0, temperature=1.0, lora_std=None):
    """A rollout of the tiny model sampled as training samples (LoRA merged where it can be), and the
    trainer's logprobs of it (LoRA unmerged, full forward). Many stop ids make rows end unevenly."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(model_dir))
    base = load_base_model(str(model_dir))
    policy = add_lora(base.to(torch.bfloat16) if bf16 else base, 4, 8, 0.0, ["all-linear"]).eval()
    if lora_std:  # LoRA B starts at 0: make the adapter matter
        for parameter in policy.parameters():
            if parameter.requires_grad:
                torch.nn.init.normal_(parameter, std=lora_std)
    if generate_path:  # the FSDP2 path: synced_gpus needs a process group; one process computes the same without
        generate = policy.generate
        policy.generate = lambda **kwargs: generate(**{**kwargs, "synced_gpus": False})
    stops = list(range(0, 49152, 40))  # ~1 in 40 tokens ends a row
    with torch.no_grad(), merged_lora_weights(policy) as sampler:
        rollout = generate_rollout(sampler, tokenizer, PROMPTS * 2, prompts=PROMPTS * 2, group_ids=list(range(8)),
                                   columns={}, max_prompt_length=32, max_new_tokens=24, temperature=temperature,
                                   top_p=top_p, synced_gpus=generate_path, eos_token_ids=stops)
    with torch.no_grad():
        trainer_logprobs, _, _ = forward_response(PolicyWithValue(policy, None), rollout, slice(None), temperature)
    return rollout, trainer_logprobs


@pytest.mark.parametrize("generate_path", [False, True], ids=["sample_responses", "fsdp2_generate"])
def test_float32_sampler_and_trainer_agree(tiny_model_dir, generate_path):
    """The plain float32 path (a large LoRA merged while sampling): the mismatch is float rounding.
    Measured: sampler/kl ~1e-12, logprob_abs_diff_mean ~5e-7, max ~2e-5 (~2e-6 without the LoRA)."""
    rollout, trainer_logprobs = sample_tiny(tiny_model_dir, generate_path=generate_path, lora_std=0.5)
    lengths = rollout.mask.sum(1)
    assert lengths.min() < lengths.max()  # rows ended at different lengths
    assert (rollout.sampler_logprobs[rollout.mask == 0] == 0).all()
    assert (rollout.sampler_logprobs[rollout.mask == 1] < 0).all()
    metrics = sampler_mismatch_metrics(sampler_mismatch_totals(trainer_logprobs, rollout.sampler_logprobs,
                                                               rollout.mask), one_process())
    print("float32", "generate" if generate_path else "sampler", metrics)
    assert metrics["sampler/logprob_abs_diff_mean"] < 5e-6 and metrics["sampler/logprob_abs_diff_max"] < 1e-4
    assert 0 <= metrics["sampler/kl"] < 1e-10


def test_bfloat16_and_top_p_sampling_show_a_mismatch(tiny_model_dir):
    """bfloat16 (sampler and trainer both bf16, as --bf16 runs: the KV-cache decode and the full
    forward round differently) is visibly off; top-p differs by exactly -log(kept mass), the
    renormalisation the trainer's full softmax lacks. Measured: bf16 mean ~5e-5, max ~1e-3,
    sampler/kl ~1.5e-8; top_p 0.9: mean = max ~0.105 = -log 0.9 on this near-uniform model."""
    rollout, trainer_logprobs = sample_tiny(tiny_model_dir, bf16=True)
    bf16 = sampler_mismatch_metrics(sampler_mismatch_totals(trainer_logprobs, rollout.sampler_logprobs,
                                                            rollout.mask), one_process())
    rollout, trainer_logprobs = sample_tiny(tiny_model_dir, top_p=0.9, temperature=0.7)
    nucleus = sampler_mismatch_metrics(sampler_mismatch_totals(trainer_logprobs, rollout.sampler_logprobs,
                                                               rollout.mask), one_process())
    print("bfloat16", bf16, "top_p 0.9", nucleus)
    assert bf16["sampler/logprob_abs_diff_mean"] > 5e-6 and bf16["sampler/logprob_abs_diff_max"] > 1e-4
    assert bf16["sampler/kl"] > 1e-10
    assert 0.0 < nucleus["sampler/logprob_abs_diff_mean"] <= -math.log(0.9) + 1e-4
    assert nucleus["sampler/kl"] > 1e-4


def test_rollout_rows_carry_the_sampler_logprobs(tiny_model_dir):
    rollout, _ = sample_tiny(tiny_model_dir)
    lp = rollout.sampler_logprobs
    assert torch.equal(rollout.select([3, 1]).sampler_logprobs, lp[[3, 1]])
    rows = torch.tensor([2, 0])
    narrow, width = rollout.narrowed(rows)
    assert torch.equal(narrow.sampler_logprobs, lp[rows, :width])
    short = rollout.select([0, 1])
    short = concat_rollouts([short, rollout.select([2])], 0)  # re-padded to the wider part
    assert short.sampler_logprobs.shape == short.mask.shape
    assert torch.equal(short.sampler_logprobs[:, :rollout.response_length], lp[:3])


# ---------------------------------------------------------------------------- TRL's importance sampling


def trl_importance_sampling(old_per_token_logps, sampling_per_token_logps, completion_mask, mode, clip_min, clip_max):
    """TRL 1.16.0 trl/trainer/grpo_trainer.py lines 2660-2705 (GRPOTrainer._generate_and_score_completions,
    use_vllm and vllm_importance_sampling_correction), self.vllm_importance_sampling_* as arguments."""
    mask = completion_mask
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode in ["sequence_mask", "token_mask"]:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio, sequence_level_is


def trl_metrics(old_per_token_logps, sampling_per_token_logps, completion_mask, ratio, sequence_level_is):
    """The same file, lines 2860-2896: what TRL logs for one process (gathers of one value)."""
    delta = torch.abs(old_per_token_logps - sampling_per_token_logps)
    mask = completion_mask.bool()
    delta = delta[mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[mask]
    return {
        "sampling/sampling_logp_difference/mean": float(torch.mean(delta)),
        "sampling/sampling_logp_difference/max": float(torch.max(delta)),
        "sampling/importance_sampling_ratio/min": float(torch.min(flat)),
        "sampling/importance_sampling_ratio/mean": float(torch.mean(flat)),
        "sampling/importance_sampling_ratio/max": float(torch.max(flat)),
    }


def mismatched_batch(seed=0, rows=6, width=7, spread=0.4):
    """float64 old and sampler logprobs that differ by ~spread per token, a ragged mask."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=generator, dtype=torch.float64) * 4
    sampler = old + torch.randn(rows, width, generator=generator, dtype=torch.float64) * spread
    lengths = torch.tensor([7, 3, 5, 1, 6, 7])[:rows]
    mask = (torch.arange(width) < lengths.unsqueeze(1)).double()
    return old, sampler * mask, mask


BOUNDS = [(None, 3.0), (0.5, 2.0), (0.8, None), (0.9, 1.1), (None, None)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bounds", BOUNDS, ids=str)
def test_importance_sampling_weights_and_metrics_equal_trls(mode, bounds):
    low, high = bounds
    if mode.endswith("truncate") and low is None and high is None:
        pytest.skip("TRL's GRPOConfig refuses a truncation without bounds (and so does RLConfig)")
    old, sampler, mask = mismatched_batch()
    trl_ratio, sequence_level = trl_importance_sampling(old, sampler, mask, mode, low, high)
    ours = importance_sampling_weights(old, sampler, mask, mode, low, high)
    assert ours.shape == old.shape
    assert torch.allclose(ours, trl_ratio.expand_as(old), rtol=0, atol=1e-12)
    metrics = sampler_mismatch_metrics(sampler_mismatch_totals(old, sampler, mask), one_process())
    metrics.update(importance_sampling_metrics(ours, mask, mode, one_process()))
    expected = trl_metrics(old, sampler, mask, trl_ratio, sequence_level)
    ours_as_trl = {**metrics, "sampling/sampling_logp_difference/mean": metrics["sampler/logprob_abs_diff_mean"],
                   "sampling/sampling_logp_difference/max": metrics["sampler/logprob_abs_diff_max"]}
    for key, value in expected.items():
        assert ours_as_trl[key] == pytest.approx(value, abs=1e-6), key


def test_truncation_caps_and_masks_drop_whole_tokens_or_sequences():
    old, sampler, mask = mismatched_batch(spread=0.6)
    raw_token = torch.exp((old - sampler) * mask)
    raw_sequence = torch.exp(((old - sampler) * mask).sum(-1))
    assert raw_token[mask.bool()].max() > 2.0 and raw_token[mask.bool()].min() < 0.7  # both bounds bite
    inside = (raw_token >= 0.7) & (raw_token <= 2.0)

    truncated = importance_sampling_weights(old, sampler, mask, "token_truncate", 0.7, 2.0)
    assert truncated.max() == 2.0 and truncated.min() == 0.7
    assert torch.equal(truncated[inside], raw_token[inside])

    masked = importance_sampling_weights(old, sampler, mask, "token_mask", 0.7, 2.0)
    assert torch.equal(masked == 0, ~inside) and torch.equal(masked[inside], raw_token[inside])

    for mode in ("sequence_truncate", "sequence_mask"):
        weights = importance_sampling_weights(old, sampler, mask, mode, 0.7, 2.0)
        assert (weights == weights[:, :1]).all()  # one weight per sequence, on every token
        kept = (raw_sequence >= 0.7) & (raw_sequence <= 2.0)
        assert not kept.all() and kept.any()
        if mode == "sequence_mask":
            assert torch.equal(weights[:, 0] == 0, ~kept)  # a sequence outside the bounds is dropped whole
        else:
            assert torch.equal(weights[:, 0], raw_sequence.clamp(0.7, 2.0))

    # Padding does not count: other values there change no weight.
    noisy = sampler + (1 - mask) * 5.0
    for mode in MODES:
        assert torch.equal(importance_sampling_weights(old, noisy, mask, mode, 0.7, 2.0),
                           importance_sampling_weights(old, sampler, mask, mode, 0.7, 2.0))


def test_no_values_give_trls_zero_metrics():
    empty = torch.zeros(2, 3)
    weights = importance_sampling_weights(empty, empty, empty, "token_mask", None, 3.0)
    assert set(importance_sampling_metrics(weights, empty, "token_mask", one_process()).values()) == {0.0}


# ---------------------------------------------------------------------------- settings and the run


def test_correction_forces_the_old_logprob_pass():
    settings = dict(advantage_estimator="grpo", num_generations=4, rollout_batch_size=4, mini_batch_size=16,
                    kl_coef=0.0, policy_loss="ppo_clip")
    estimator, updater = ADVANTAGE_ESTIMATORS["grpo"], UPDATERS["optimizer"]
    assert not plan_passes(RLConfig(**settings), estimator, updater).old  # one epoch, one minibatch
    for mode in MODES:
        assert plan_passes(RLConfig(**settings, importance_sampling_correction=mode), estimator, updater).old


def test_mode_lists_agree():
    assert config_module.IMPORTANCE_SAMPLING_MODES == experience.IMPORTANCE_SAMPLING_MODES


def test_trl_names_set_the_correction():
    config = parse_config(["--vllm_importance_sampling_correction", "--vllm_importance_sampling_mode", "token_truncate",
                           "--vllm_importance_sampling_clip_min", "0.5", "--vllm_importance_sampling_clip_max", "none"])
    assert (config.importance_sampling_correction, config.importance_sampling_min,
            config.importance_sampling_max) == ("token_truncate", 0.5, None)
    # TRL's defaults: correction on in sequence_mask mode, clip_max 3.0; the deprecated cap is clip_max
    config = RLConfig.from_dict({"vllm_importance_sampling_correction": True, "vllm_importance_sampling_cap": 2.0})
    assert (config.importance_sampling_correction, config.importance_sampling_max) == ("sequence_mask", 2.0)
    mode_only = RLConfig.from_dict({"vllm_importance_sampling_mode": "token_mask"})
    assert mode_only.importance_sampling_correction == "token_mask"
    assert RLConfig.from_dict({"vllm_importance_sampling_correction": False,
                               "vllm_importance_sampling_mode": "token_mask"}).importance_sampling_correction == "none"
    assert RLConfig().importance_sampling_correction == "none" and RLConfig().importance_sampling_max == 3.0
    with pytest.raises(ConfigError, match="keep one"):
        parse_config(["--vllm_importance_sampling_cap", "2", "--vllm_importance_sampling_clip_max", "3"])
    with pytest.raises(ConfigError, match="no counterpart"):  # the other vllm_* settings stay refused
        parse_config(["--vllm_gpu_memory_utilization", "0.5"])


@pytest.mark.parametrize("argv,fragment", [
    (["--importance_sampling_min", "2", "--importance_sampling_max", "1"], "must be less than importance_sampling_max"),
    (["--importance_sampling_min", "-0.5"], "importance_sampling_min must be >= 0"),
    (["--importance_sampling_max", "-1"], "importance_sampling_max must be > 0"),
    (["--vllm_importance_sampling_clip_min", "4"], "must be less than importance_sampling_max (3.0)"),
    (["--importance_sampling_correction", "token_truncate", "--importance_sampling_max", "none"],
     "set importance_sampling_min"),
    (["--importance_sampling_correction", "tis"], "is not one of: none, token_truncate"),
])
def test_bad_bounds_are_one_line_errors(run_here, tiny_model_dir, tmp_path, argv, fragment):
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "run", *argv))
    assert_one_line_error(result, fragment)


def test_trpo_refuses_the_correction():
    with pytest.raises(ConfigError, match="TRPO"):
        RLConfig(importance_sampling_correction="token_mask", update_method="trpo")


@pytest.mark.parametrize("mode", MODES)
def test_one_step_run_with_each_mode(run_here, tiny_model_dir, tmp_path, mode):
    """The CLI run takes the old-logprob pass, logs the mismatch and TRL's IS metrics; on the float32
    tiny model the sampler is the trainer up to rounding, so every weight is ~1."""
    out = tmp_path / mode
    # 4 prompts x 2 samples in one minibatch, one epoch: only the correction asks for the old pass
    result = run_here("train_grpo.py", *tiny_args(
        tiny_model_dir, out, "--max_steps", "1", "--num_generations", "2", "--mini_batch_size", "8",
        "--advantage_estimator", "grpo", "--kl_coef", "0", "--importance_sampling_correction", mode,
        "--importance_sampling_min", "0.5"))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_metrics(out)
    assert row["sampler/logprob_abs_diff_mean"] < 1e-5 and 0 <= row["sampler/kl"] < 1e-8
    assert row["sampling/sampling_logp_difference/max"] == row["sampler/logprob_abs_diff_max"]
    for stat in ("min", "mean", "max"):
        assert row[f"sampling/importance_sampling_ratio/{stat}"] == pytest.approx(1.0, abs=1e-4)
    assert math.isfinite(row["policy_loss"])


def test_experience_carries_the_weights(tiny_model_dir, tmp_path):
    from rlhf.trainer import RLTrainer

    config = RLConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path), max_steps=1,
                      rollout_batch_size=2, num_generations=4, mini_batch_size=8, max_new_tokens=6, lora_r=4,
                      lora_alpha=8, advantage_estimator="grpo", kl_coef=0.0, save_steps=0, num_samples_to_log=0,
                      reward_funcs=["length"], importance_sampling_correction="sequence_truncate")
    trainer = RLTrainer(config)
    assert not trainer.old_logprobs_from_update
    rollout = trainer.rollout()
    batch, metrics = trainer.make_experience(rollout, torch.linspace(-1, 1, len(rollout)))
    assert batch.sampler_logprobs is rollout.sampler_logprobs
    assert batch.is_weights.shape == rollout.mask.shape
    expected = importance_sampling_weights(batch.old_logprobs, rollout.sampler_logprobs, rollout.mask,
                                           "sequence_truncate", None, 3.0)
    assert torch.equal(batch.is_weights, expected)
    assert metrics["sampling/importance_sampling_ratio/max"] <= 3.0 and "sampler/kl" in metrics


def test_one_update_per_rollout_measures_the_mismatch_on_the_updates_forward(run_here, tiny_model_dir, tmp_path):
    """GRPO's default shape skips the old-logprob pass; the update's own forward then gives the
    sampler/* metrics (before: none logged). top_p 0.9 makes them visibly non-zero: the sampler
    renormalises over the nucleus, the trainer scores the full softmax (-log kept mass per token)."""
    out = tmp_path / "run"
    result = run_here("train_grpo.py", *tiny_args(
        tiny_model_dir, out, "--max_steps", "1", "--num_generations", "2", "--mini_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--advantage_estimator", "grpo", "--kl_coef", "0", "--top_p", "0.9"))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_metrics(out)
    assert 0.0 < row["sampler/logprob_abs_diff_mean"] <= row["sampler/logprob_abs_diff_max"] <= -math.log(0.9) + 1e-3
    assert row["sampler/kl"] > 1e-4
