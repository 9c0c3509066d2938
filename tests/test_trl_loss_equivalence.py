"""Every TRL loss_type at both importance_sampling_levels, and the loss-side options, against TRL
1.16's own GRPOTrainer._compute_loss (tests/trl_reference.py) on identical inputs: the same loss
value and the same gradient with respect to the logprobs (and the entropies, for the entropy
bonus), to float32 tolerance.

Our side goes the way a TRL config does: TRL's names -> RLConfig.from_dict (rlhf.aliases) -> the
update's loss composition (rlhf.update.loss_terms) with one micro-batch = the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algorithms import POLICY_LOSSES, agg_loss
from rlhf.algorithms.losses import AdaptiveEntropyController, gamma_weights, high_entropy_mask
from rlhf.config import RLConfig
from rlhf.errors import ConfigError
from rlhf.update import loss_terms
from trl_reference import B, T, batch, trl_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
# TRL refuses nothing here but warns; LUSPO is sequence-level and VESPO token-level by definition.
CASES = [(t, level) for t in LOSS_TYPES for level in ("token", "sequence")
         if not (t == "luspo" and level == "token") and not (t == "vespo" and level == "sequence")]
BASE = {"advantage_estimator": "grpo", "num_generations": 4, "rollout_batch_size": 2, "mini_batch_size": B,
        "max_completion_length": T, "beta": 0.0, "kl_in_reward": False, "kl_estimator": "k3"}


def ours(settings: dict, data: dict, *, old: bool = True, sampler: bool = False, is_ratio: bool = False,
         last_entropy: float = math.inf) -> dict:
    """Our loss for a config given in TRL's names, on the same tensors: (loss, d/d logprobs, d/d entropy)."""
    config = RLConfig.from_dict({**BASE, **settings})
    logprobs = data["logprobs"].clone().requires_grad_(True)
    entropy = data["entropy"].clone().requires_grad_(True)
    advantages = data["advantages"].unsqueeze(-1).expand(B, T)  # per-token advantages, constant over a row
    terms, stats = loss_terms(
        POLICY_LOSSES[config.policy_loss], config, logprobs, data["old_logprobs"] if old else logprobs.detach(),
        advantages, data["mask"], entropy=entropy, ref_logprobs=data["ref_logprobs"] if config.kl_coef else None,
        sampler_logprobs=data["sampler_logprobs"] if sampler else None,
        is_weights=data["is_ratio"] if is_ratio else None)
    total = terms["policy"]
    if "kl" in terms:
        total = total + config.kl_coef * terms["kl"]
    control = AdaptiveEntropyController(config.entropy_coef, config.use_adaptive_entropy, config.entropy_target,
                                        config.entropy_coef_min, config.entropy_coef_max, config.entropy_coef_delta)
    control.last_entropy = last_entropy
    if control.enabled:
        total = total - control.applied() * terms["entropy"]
    total.backward()
    return {"loss": total.detach(), "grad_logprobs": logprobs.grad, "stats": stats, "config": config, "terms": terms,
            "grad_entropy": torch.zeros_like(entropy) if entropy.grad is None else entropy.grad}


def assert_same(mine: dict, theirs: dict) -> None:
    torch.testing.assert_close(mine["loss"], theirs["loss"].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mine["grad_logprobs"], theirs["grad_logprobs"].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mine["grad_entropy"], theirs["grad_entropy"].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss_type,level", CASES)
def test_every_trl_loss_type_and_level_equals_trl(loss_type, level):
    data = batch(seed=1)
    # cispo: a cap of 1.1 cuts some ratios (TRL's default, epsilon 0.2, would cut every one)
    high = {"epsilon_high": 1.1} if loss_type == "cispo" else {}
    theirs = trl_loss(loss_type, level, data, **high)
    mine = ours({"loss_type": loss_type, "importance_sampling_level": level, **high}, data)
    assert_same(mine, theirs)
    assert theirs["grad_logprobs"].abs().sum() > 0  # the comparison has something to compare
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio",
                 "vespo/phi_seq_mean"):
        if name in theirs["metrics"]:
            assert mine["stats"][name] == pytest.approx(theirs["metrics"][name], abs=1e-6), name


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("luspo", "sequence")])
def test_trl_defaults_when_a_config_gives_only_the_loss_type(loss_type, level):
    """TRL's epsilon 0.2 holds at the sequence level too (our gspo entry's 3e-4 must not leak in);
    with old logprobs equal to the current ones (one update per rollout) the ratio is 1."""
    data = batch(seed=2, drift=0.05)
    mine = ours({"loss_type": loss_type, "importance_sampling_level": level}, data)
    assert mine["config"].policy_loss_settings().get("clip_range", 0.2) == 0.2
    assert_same(mine, trl_loss(loss_type, level, data))
    assert_same(ours({"loss_type": loss_type, "importance_sampling_level": level}, data, old=False),
                trl_loss(loss_type, level, data, old=False))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "luspo", "bnpo"])
def test_delta_two_sided_clip(loss_type):
    data = batch(seed=3, drift=0.8)  # ratios far from 1 so that delta = 1.5 caps some
    level = "sequence" if loss_type == "luspo" else "token"
    theirs = trl_loss(loss_type, level, data, delta=1.5)
    assert_same(ours({"loss_type": loss_type, "importance_sampling_level": level, "delta": 1.5}, data), theirs)
    assert not torch.allclose(theirs["grad_logprobs"], trl_loss(loss_type, level, data)["grad_logprobs"])


@pytest.mark.parametrize("loss_type,level", [("sapo", "token"), ("sapo", "sequence"), ("vespo", "token")])
def test_sapo_temperatures_and_vespo_shape_parameters(loss_type, level):
    data = batch(seed=4)
    params = ({"sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.6} if loss_type == "sapo" else
              {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.0, "vespo_lambda_neg": 1.0})
    theirs = trl_loss(loss_type, level, data, **params)
    assert_same(ours({"loss_type": loss_type, "importance_sampling_level": level, **params}, data), theirs)
    assert not torch.allclose(theirs["grad_logprobs"], trl_loss(loss_type, level, data)["grad_logprobs"])


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("sapo", "token"),
                                             ("luspo", "sequence")])
@pytest.mark.parametrize("quantile", [0.2, 0.0])
def test_top_entropy_quantile(loss_type, level, quantile):
    data = batch(seed=5)
    theirs = trl_loss(loss_type, level, data, top_entropy_quantile=quantile)
    assert_same(ours({"loss_type": loss_type, "importance_sampling_level": level,
                      "top_entropy_quantile": quantile}, data), theirs)


def test_high_entropy_mask_keeps_the_top_share_of_real_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # 7.0 is padding: never kept
    keep = high_entropy_mask(entropy, mask, 2 / 6)
    assert keep.tolist() == [[False, True, False, False], [False, True, False, False]]
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("vespo", "token")])
@pytest.mark.parametrize("sampler", [False, True])
def test_off_policy_mask_threshold(loss_type, level, sampler):
    data = batch(seed=6, drift=0.6)
    high = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    theirs = trl_loss(loss_type, level, data, off_policy_mask_threshold=0.05, sampler=sampler, **high)
    # the sampler's logprobs are the reference where the run corrects for a separate sampler (TRL: vLLM)
    separate = {"importance_sampling_correction": "token_truncate"} if sampler else {}
    mine = ours({"loss_type": loss_type, "importance_sampling_level": level, "off_policy_mask_threshold": 0.05,
                 **high, **separate}, data, sampler=sampler)
    assert_same(mine, theirs)
    unmasked = trl_loss(loss_type, level, data, **high)
    assert not torch.allclose(theirs["grad_logprobs"], unmasked["grad_logprobs"])  # some sequence was dropped


def test_off_policy_mask_uses_the_old_logprobs_when_the_sampler_is_not_corrected_for():
    """Our sampler always records its logprobs; without importance_sampling_correction the mask
    compares with the rollout policy's, as TRL does without vLLM (its top-p renormalisation would
    otherwise shift every token's log-ratio by log(kept mass))."""
    data = batch(seed=6, drift=0.6)
    theirs = trl_loss("grpo", "token", data, off_policy_mask_threshold=0.05, sampler=False)
    mine = ours({"loss_type": "grpo", "off_policy_mask_threshold": 0.05}, data, sampler=True)
    assert_same(mine, theirs)


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("grpo", "sequence"), ("dr_grpo", "token"),
                                             ("luspo", "sequence"), ("vespo", "token")])
@pytest.mark.parametrize("correction", [True, False])
def test_kl_term_with_and_without_bias_correction(loss_type, level, correction):
    data = batch(seed=7)
    theirs = trl_loss(loss_type, level, data, beta=0.04, use_bias_correction_kl=correction)
    assert_same(ours({"loss_type": loss_type, "importance_sampling_level": level, "beta": 0.04,
                      "use_bias_correction_kl": correction}, data), theirs)


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "sequence"),
                                             ("sapo", "token"), ("vespo", "token")])
def test_sampler_importance_weights(loss_type, level):
    """is_weights multiply every loss's per-token loss but vespo's, whose sequence weight takes them."""
    data = batch(seed=8)
    high = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    theirs = trl_loss(loss_type, level, data, is_ratio=True, **high)
    assert_same(ours({"loss_type": loss_type, "importance_sampling_level": level, **high}, data, is_ratio=True), theirs)
    assert not torch.allclose(theirs["grad_logprobs"], trl_loss(loss_type, level, data, **high)["grad_logprobs"])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("quantile", [1.0, 0.3])
def test_entropy_bonus(loss_type, quantile):
    data = batch(seed=9)
    theirs = trl_loss(loss_type, "token", data, entropy_coef=0.01, top_entropy_quantile=quantile)
    mine = ours({"loss_type": loss_type, "entropy_coef": 0.01, "top_entropy_quantile": quantile}, data)
    assert_same(mine, theirs)
    assert theirs["grad_entropy"].abs().sum() > 0


@pytest.mark.parametrize("last_entropy", [0.1, 5.0, math.inf])  # below the target: applied; above / unmeasured: not
def test_adaptive_entropy_applies_and_updates_the_coefficient_as_trl(last_entropy):
    data = batch(seed=10)
    settings = {"entropy_coef": 0.02, "use_adaptive_entropy": True, "entropy_target": 2.0, "entropy_coef_delta": 0.01}
    theirs = trl_loss("dapo", "token", data, entropy_coef=0.02, use_adaptive_entropy=True,
                      last_world_entropy=last_entropy, entropy_target=2.0, entropy_coef_delta=0.01)
    mine = ours({"loss_type": "dapo", **settings}, data, last_entropy=last_entropy)
    assert_same(mine, theirs)
    # after the step TRL moved its coefficient by the step's entropy; ours does the same from its window
    control = AdaptiveEntropyController(0.02, True, target=2.0, coef_delta=0.01)
    control.update(float(mine["terms"]["entropy"]))
    assert control.value == pytest.approx(theirs["stub"].entropy_coef)
    assert control.last_entropy == pytest.approx(theirs["stub"]._last_world_entropy)


def test_entropy_controller_state_round_trips():
    control = AdaptiveEntropyController(0.1, True, target=1.0, coef_min=0.0, coef_max=0.12, coef_delta=0.05)
    assert control.applied() == 0.0  # nothing measured yet
    control.update(0.5)  # below the target: up, capped at coef_max
    assert (control.value, control.applied()) == (0.12, 0.12)
    restored = AdaptiveEntropyController(0.1, True, target=1.0, coef_min=0.0, coef_max=0.12, coef_delta=0.05)
    restored.load_state_dict(control.state_dict())
    assert (restored.value, restored.last_entropy) == (0.12, 0.5)
    fresh = AdaptiveEntropyController(0.1, True)
    fresh.load_state_dict(AdaptiveEntropyController(0.1, True).state_dict())  # inf is stored as null
    assert fresh.last_entropy == math.inf


def test_gamma_weights_is_one_on_policy_and_decays_away_from_it():
    adv, mask = torch.ones(3, 2), torch.ones(3, 2)
    log_ratio = torch.tensor([[0.0, 0.0], [0.5, 0.5], [-1.0, -1.0]])
    phi = gamma_weights(adv, log_ratio, mask)[:, 0]
    assert phi[0] == pytest.approx(1.0) and phi[1] < 1.0 and phi[2] < 1.0


def test_micro_batch_token_mean_is_the_micro_batch_token_mean():
    loss, mask = torch.arange(6.0).view(2, 3), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(agg_loss(loss, mask, "micro-batch-token-mean")) == pytest.approx((0 + 1 + 3) / 3)


@pytest.mark.parametrize("settings,fragment", [
    ({"loss_type": "luspo", "importance_sampling_level": "token"}, "needs importance_sampling_level 'sequence'"),
    ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "importance_sampling_level must be 'token'"),
    ({"loss_type": "dapo", "delta": 0.5}, "delta caps the importance ratio and must be > 1"),
    ({"loss_type": "sapo", "sapo_temperature_pos": 0.0}, "temperature_pos and temperature_neg must be > 0"),
    ({"loss_type": "dapo", "sapo_temperature_pos": 1.0}, "has no parameter 'temperature_pos'"),
    ({"loss_type": "cispo", "delta": 2.0}, "has no parameter 'delta'"),
    ({"loss_type": "cispo", "epsilon_high": 5.0, "policy_loss_kwargs": {"epsilon_high": 4.0}},
     "both set cispo's cap; give one"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must be in [0, 1]"),
    ({"off_policy_mask_threshold": -1.0}, "off_policy_mask_threshold must be >= 0"),
    ({"use_adaptive_entropy": True, "entropy_coef": 2.0}, "must lie in [entropy_coef_min, entropy_coef_max]"),
    ({"loss_type": "vespo", "importance_sampling_correction": "sequence_mask"}, "token-level importance_sampling_correction"),
    ({"update_method": "trpo", "top_entropy_quantile": 0.2}, "update_method trpo does not use them"),
    ({"update_method": "trpo", "loss_type": "bnpo"}, "needs update_method optimizer"),
])
def test_impossible_loss_settings_are_one_line_config_errors(settings, fragment):
    with pytest.raises(ConfigError) as caught:
        RLConfig.from_dict({**BASE, **settings})
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_options_need_a_loss_that_takes_token_weights():
    @POLICY_LOSSES.register("plain_test_loss")
    def plain(logprobs, old_logprobs, advantages, mask, *, loss_agg_mode: str = "token-mean"):
        return agg_loss(-advantages * logprobs, mask, loss_agg_mode), {}

    try:
        with pytest.raises(ConfigError, match="top_entropy_quantile need a policy loss that takes token_weights"):
            RLConfig.from_dict({**BASE, "policy_loss": "plain_test_loss", "top_entropy_quantile": 0.5})
    finally:
        del POLICY_LOSSES["plain_test_loss"]


# ---------------------------------------------------------------- one tiny run per new loss type and option

def _run(run_here, tiny_model_dir, out, *flags):
    from conftest import ROOT, tiny_args

    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "grpo.yaml"),
                      *tiny_args(tiny_model_dir, out, "--max_steps", "1", "--rollout_batch_size", "2",
                                 "--mini_batch_size", "4", "--gradient_accumulation_steps", "2", "--ppo_epochs", "2",
                                 *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    from test_train_e2e import read_metrics

    return read_metrics(out)


@pytest.mark.parametrize("flags,metric", [
    (["--loss_type", "sapo"], "sapo/gate_mean"),
    (["--loss_type", "luspo", "--importance_sampling_level", "sequence"], "clip_ratio/region_mean"),
    (["--loss_type", "vespo", "--vespo_k_pos", "1.5"], "vespo/phi_seq_mean"),
    (["--loss_type", "bnpo", "--delta", "4"], "clip_ratio/low_mean"),
    (["--loss_type", "cispo", "--importance_sampling_level", "sequence", "--epsilon_high", "5"], "cispo_clip_ratio"),
    (["--loss_type", "dapo", "--top_entropy_quantile", "0.2", "--off_policy_mask_threshold", "0.01",
      "--beta", "0.05", "--use_bias_correction_kl", "true", "--entropy_coef", "0.01"], "entropy_bonus_coef"),
])
def test_one_step_through_the_cli(run_here, tiny_model_dir, tmp_path, flags, metric):
    row = _run(run_here, tiny_model_dir, tmp_path / "run", *flags)[0]
    assert math.isfinite(row["policy_loss"]) and math.isfinite(row[metric]), row
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "loss_type" not in saved  # saved in our names


def test_adaptive_entropy_state_survives_a_resume(run_here, tiny_model_dir, tmp_path):
    """entropy_target far above any entropy: the coefficient rises by entropy_coef_delta at every
    optimizer step (2 per step here); a resumed run continues from the saved value, not the initial one."""
    import json

    out = tmp_path / "run"
    flags = ["--use_adaptive_entropy", "true", "--entropy_coef", "0.0", "--entropy_coef_delta", "0.01",
             "--entropy_target", "100", "--save_steps", "1"]
    rows = _run(run_here, tiny_model_dir, out, *flags)
    # 8 responses, minibatches of 4, 2 epochs: 4 optimizer steps -> 0.01 .. 0.04, logged as their mean
    assert rows[-1]["entropy_coef"] == pytest.approx(0.025)
    state = json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert state["entropy_controller"]["value"] == pytest.approx(0.04)
    rows = _run(run_here, tiny_model_dir, out, *flags, "--max_steps", "2", "--resume_from_checkpoint", "latest")
    assert rows[-1]["step"] == 2 and rows[-1]["entropy_coef"] == pytest.approx(0.065)  # 0.05 .. 0.08


def test_review_fixes_trl_cispo_default_split_sources_and_narrowed_entropy_bounds(tmp_path):
    """A stranger's review: (1) loss_type cispo without epsilon_high gets TRL's cap, epsilon (0.2),
    with a warning (it was 5.0, and TRL's value was refused); (2) a loss type in the YAML and
    importance_sampling_level on the command line meet (luspo at token level ran at sequence
    level); (3) a resume that narrows entropy_coef_max holds the new bound from its first step."""
    import warnings

    from rlhf.parsing import parse_dataclass

    with pytest.warns(UserWarning, match="TRL caps every importance weight at epsilon"):
        config = RLConfig.from_dict({"loss_type": "cispo", "epsilon": 0.3})
    assert config.policy_loss_kwargs["epsilon_high"] == 0.3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="loss_type cispo")  # not the cap's warning (TRL's defaults' may come)
        assert RLConfig.from_dict({"loss_type": "cispo", "epsilon_high": 5.0}).policy_loss_kwargs["epsilon_high"] == 5.0

    yaml_file = tmp_path / "trl.yaml"
    yaml_file.write_text("loss_type: luspo\n")
    with pytest.raises(ConfigError, match="luspo"):
        parse_dataclass(RLConfig, ["--config", str(yaml_file), "--importance_sampling_level", "token"])
    yaml_file.write_text("loss_type: vespo\n")
    with pytest.raises(ConfigError, match="vespo computes its sequence weight itself"):
        parse_dataclass(RLConfig, ["--config", str(yaml_file), "--importance_sampling_level", "sequence"])
    assert parse_dataclass(RLConfig, ["--config", str(yaml_file), "--importance_sampling_level", "token"]
                           ).policy_loss == "vespo"

    control = AdaptiveEntropyController(0.0, True, coef_max=0.01)
    control.load_state_dict({"value": 0.04, "last_entropy": 0.1})
    assert control.value == 0.01
