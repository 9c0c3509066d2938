"""Advantages equal to the peers that ship them, on the same inputs: TRL 1.16's scale_rewards and
multi-objective aggregation (TRL's own lines, read from the installed grpo_trainer.py and run on
the same rewards), and verl's REINFORCE++-baseline (a loop transcription of verl's function, and
verl's function itself where verl is installed)."""

from __future__ import annotations

import ast
import importlib.util
import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, tiny_args
from reward_models import CombinedReward
from rlhf.algorithms import ADVANTAGE_ESTIMATORS, token_level_rewards
from rlhf.algorithms.advantages import normalize_then_sum, scale_rewards_mode
from rlhf.config import RLConfig
from rlhf.errors import ConfigError, RewardError
from rlhf.scoring import fill_unscorable, score
from test_correctness import as_processes
from test_scoring import TOKENIZER, OneProcess, text_rollout
from test_train_e2e import lora_b_norm, read_metrics

TRL_TRAINER = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "trainer"


def _trl_lines(first: str, last: str) -> str:
    """The lines of TRL's grpo_trainer.py from the one containing ``first`` to the one containing
    ``last``, dedented (read, not imported: importing TRL's trainer costs seconds)."""
    lines = (TRL_TRAINER / "grpo_trainer.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if last in lines[i])
    return textwrap.dedent("\n".join(lines[start:end + 1]))


def _trl_function(name: str) -> str:
    source = (TRL_TRAINER / "utils.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(source, node)


# TRL 1.16 _generate_and_score_completions: unscorable rows, the aggregation, scale_rewards, NaN -> 0.
TRL_ADVANTAGES = _trl_lines("unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
                            "advantages = torch.nan_to_num(advantages, nan=0.0)")


def trl_advantages(rewards_per_func: torch.Tensor, weights: list[float], num_generations: int,
                   scale_rewards: str = "group", aggregation: str = "sum_then_normalize") -> torch.Tensor:
    """TRL's advantages [B] of the gathered rewards [B, K] (NaN = None; groups are consecutive rows)."""
    namespace = {"torch": torch}
    exec(_trl_function("nanstd"), namespace)
    trainer = SimpleNamespace(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
                              reward_weights=torch.tensor(weights), reward_funcs=[None] * len(weights))
    namespace.update(self=trainer, rewards_per_func=rewards_per_func, num_generations=num_generations, device="cpu")
    exec(TRL_ADVANTAGES, namespace)
    return namespace["advantages"]


# 3 prompts x 4 samples, 3 reward functions. Group 1: `correct` has no spread, `formatted` one
# value only (no std: TRL leaves it out of the sum); None in `formatted` for some samples.
N = None
REWARDS = {
    "correct": [1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0],
    "formatted": [0.5, N, 1, 0, N, N, N, 1, 1, 1, 0.5, 0],
    "brevity": [-0.2, 0.4, 0.1, 0.3, 0.05, -0.1, 0.7, 0.2, 0.9, -0.6, 0.0, 0.25],
}
WEIGHTS = [1.0, 0.5, 2.0]
GROUPS = [0] * 4 + [1] * 4 + [2] * 4


def reward_function(name: str):
    def reward(prompts, completions, **kwargs):
        return [None if v is None else float(v) for v in REWARDS[name]]
    reward.__name__ = name
    return reward


class Reducer(OneProcess):
    def gather(self, tensor):
        return tensor

    def mean(self, value):
        return float(torch.as_tensor(value).float().mean())


def our_advantages(aggregation: str, **estimator_kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """The trainer's path on the hand-made batch: score -> fill_unscorable -> token rewards -> grpo."""
    rollout = text_rollout([f"answer {i}" for i in range(12)], group_ids=GROUPS)
    config = RLConfig(advantage_estimator="grpo", num_generations=4, reward_weights=WEIGHTS,
                      reward_funcs=list(REWARDS), reward_aggregation=aggregation)
    reward = CombinedReward([reward_function(name) for name in REWARDS], WEIGHTS)
    scores, _, metrics = score(reward, rollout, config, Reducer(), step=1)
    scores, _ = fill_unscorable(scores, rollout.group_ids)
    token_rewards = token_level_rewards(scores, rollout.mask)
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"](token_rewards, rollout.mask, group_ids=rollout.group_ids,
                                                 **estimator_kwargs)
    assert bool((advantages == advantages[:, :1] * rollout.mask).all())  # one value per response
    return advantages[:, 0], metrics


def rewards_per_func() -> torch.Tensor:
    return torch.tensor([[math.nan if REWARDS[f][i] is None else REWARDS[f][i] for f in REWARDS] for i in range(12)])


# ------------------------------------------------------------------ scale_rewards (TRL's meaning)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_gives_trls_advantages(scale):
    ours, _ = our_advantages("sum", eps=1e-4, scale_rewards=scale)  # TRL divides by std + 1e-4
    theirs = trl_advantages(rewards_per_func(), WEIGHTS, 4, scale_rewards=scale)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-6), (ours, theirs)
    others = {s: our_advantages("sum", eps=1e-4, scale_rewards=s)[0] for s in ("group", "batch", "none") if s != scale}
    assert all((ours - other).abs().max() > 0.05 for other in others.values())  # the batch tells them apart


def test_scale_rewards_takes_trls_booleans_and_refuses_other_words():
    modes = [scale_rewards_mode(v) for v in (True, False, "group", "batch", "none")]
    assert modes == ["group", "none", "group", "batch", "none"]
    with pytest.raises(ConfigError, match="scale_rewards must be one of group, batch, none"):
        RLConfig(advantage_estimator="grpo", num_generations=4, advantage_kwargs={"scale_rewards": "global"})


def test_batch_std_is_the_std_of_every_process():
    torch.manual_seed(0)
    mask = (torch.arange(5) < torch.tensor([5, 3, 4, 2, 5, 1, 4, 3]).unsqueeze(1)).float()
    rewards = torch.randn(8, 5) * mask
    rewards[4:] *= 4.0  # process 1's groups spread 4x wider
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    grpo = ADVANTAGE_ESTIMATORS["grpo"]
    whole, _ = grpo(rewards, mask, group_ids=groups, scale_rewards="batch")
    halves = [(rewards[:4], mask[:4], groups[:4]), (rewards[4:], mask[4:], groups[4:])]
    alone = torch.cat([grpo(r, m, group_ids=g, scale_rewards="batch")[0] for r, m, g in halves])
    assert (alone - whole).abs().max() > 0.5  # each process's own std is not the batch's
    parts = as_processes(lambda shard, reduce: grpo(shard[0], shard[1], group_ids=shard[2], scale_rewards="batch",
                                                    all_reduce=reduce)[0], halves)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


# ------------------------------------------------------------------ multi-objective aggregation (GDPO)


def test_sum_then_normalize_is_the_default_and_trls():
    ours, metrics = our_advantages("sum", eps=1e-4)
    assert torch.allclose(ours, trl_advantages(rewards_per_func(), WEIGHTS, 4), atol=1e-6, rtol=1e-6)
    assert not any(key.startswith("advantages/") for key in metrics)


def test_normalize_then_sum_gives_trls_advantages_and_logs_each_function():
    ours, metrics = our_advantages("normalize_then_sum", eps=1e-4, scale_rewards="batch")
    theirs = trl_advantages(rewards_per_func(), WEIGHTS, 4, aggregation="normalize_then_sum")
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-6), (ours, theirs)
    assert (ours - our_advantages("sum", eps=1e-4, scale_rewards="batch")[0]).abs().max() > 0.1
    # each function's group-normalised values, from plain Python: (r - mean) / (stdev + 1e-4)
    for name, values in REWARDS.items():
        z = []
        for group in range(3):
            present = [v for v in values[4 * group:4 * group + 4] if v is not None]
            if len(present) > 1:
                mean, std = statistics.fmean(present), statistics.stdev(present)
                z += [(v - mean) / (std + 1e-4) for v in present]
        assert metrics[f"advantages/{name}/mean"] == pytest.approx(statistics.fmean(z), abs=1e-6)
        assert metrics[f"advantages/{name}/std"] == pytest.approx(statistics.stdev(z), abs=1e-6)
    plain_sum = [sum(w * (REWARDS[f][i] or 0.0) for f, w in zip(REWARDS, WEIGHTS)) for i in range(12)]
    assert metrics["reward_mean"] == pytest.approx(statistics.fmean(plain_sum), abs=1e-6)  # logged as before


def test_normalize_then_sum_separates_what_a_sum_merges():
    """GDPO's example: rewards (1, 0) and (0, 1) sum to the same total; normalised per function
    they differ when the functions' spreads differ."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    total, z = normalize_then_sum(rewards, torch.ones(2), torch.zeros(4, dtype=torch.long))
    assert rewards.sum(-1)[0] == rewards.sum(-1)[1] and abs(float(total[0] - total[1])) > 0.1
    assert torch.allclose(z.sum(0), torch.zeros(2), atol=1e-6)  # each function has group mean 0


def test_normalize_then_sum_keeps_a_function_whose_squares_overflow_float32():
    """Each function's z does not depend on its scale. Before: a function returning values of 1e25
    had a float32 std of inf, so its z was 0 for every sample (measured: z[:, 0] all 0) and the
    advantages the other function's alone; a function of NaNs and a normal one stay as they were."""
    rewards = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.5, 0.0], [2.0, float("nan")], [4.0, 1.0], [1.0, 2.0]])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    unit_total, unit_z = normalize_then_sum(rewards, torch.tensor([1.0, 0.5]), groups, eps=1e-12)
    huge_total, huge_z = normalize_then_sum(rewards * torch.tensor([1e25, 1.0]), torch.tensor([1.0, 0.5]), groups,
                                            eps=1e-12)  # eps 1e-4 moves unit-scale z by 1e-4, not huge ones
    assert bool(unit_z[:, 0].abs().min() > 0.1)
    torch.testing.assert_close(huge_z, unit_z, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(huge_total, unit_total, rtol=1e-5, atol=1e-6)
    # a reviewer's: equal huge values have no spread (z near 0, as equal small ones), not a z of -0.82
    _, equal_z = normalize_then_sum(torch.tensor([[1e30, 1.0], [1e30, 2.0], [1e30, 3.0]]), torch.ones(2),
                                    torch.zeros(3, dtype=torch.long))
    assert float(equal_z[:, 0].abs().max()) < 1e-3


def test_normalize_then_sum_settings_and_trls_names():
    with pytest.raises(ConfigError, match="normalize_then_sum normalises each reward function .* num_generations >= 2"):
        RLConfig(reward_aggregation="normalize_then_sum", advantage_estimator="reinforce")
    with pytest.raises(ConfigError, match="reward_aggregation 'mean' is not one of: sum, normalize_then_sum"):
        RLConfig(reward_aggregation="mean")
    group = {"advantage_estimator": "grpo", "num_generations": 4}
    # TRL divides the sum by the batch std whatever its scale_rewards says
    gdpo = RLConfig.from_dict({"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "group", **group})
    assert gdpo.reward_aggregation == "normalize_then_sum"
    assert gdpo.advantage_kwargs == {"scale_rewards": "batch", "eps": 1e-4}  # TRL's std + 1e-4
    plain = RLConfig.from_dict({"multi_objective_aggregation": "sum_then_normalize", "scale_rewards": "batch", **group})
    assert plain.reward_aggregation == "sum" and plain.advantage_kwargs == {"scale_rewards": "batch"}
    with pytest.raises(ConfigError, match="multi_objective_aggregation 'mean' is not one of TRL's"):
        RLConfig.from_dict({"multi_objective_aggregation": "mean", **group})


def test_normalize_then_sum_refuses_process_rewards():
    def per_letter(prompts, completions, **kwargs):
        return [[(0, 0.1)] for _ in completions]

    rollout = text_rollout(["ab", "cd"], group_ids=[0, 0])
    config = RLConfig(advantage_estimator="grpo", num_generations=2, reward_aggregation="normalize_then_sum")
    with pytest.raises(RewardError, match="returned process rewards .* use reward_aggregation sum"):
        score(CombinedReward([per_letter]), rollout, config, Reducer(), step=1, tokenizer=TOKENIZER)


# ------------------------------------------------------------------ REINFORCE++-baseline (verl, OpenRLHF)


def reinforce_pp_baseline_loops(token_rewards: torch.Tensor, mask: torch.Tensor, group_ids: list[int]) -> torch.Tensor:
    """verl's compute_reinforce_plus_plus_baseline_outcome_advantage as plain loops: response
    score minus its group's mean (0 for a group of one), on every real token, then whitened over
    all real tokens (unbiased variance, + 1e-8)."""
    rows, masks = token_rewards.double().tolist(), mask.tolist()
    scores = [sum(r * m for r, m in zip(row, mrow)) for row, mrow in zip(rows, masks)]
    by_group = defaultdict(list)
    for s, g in zip(scores, group_ids):
        by_group[g].append(s)
    centred = [s - (statistics.fmean(by_group[g]) if len(by_group[g]) > 1 else 0.0) for s, g in zip(scores, group_ids)]
    tokens = [centred[i] for i, mrow in enumerate(masks) for m in mrow if m]
    mean, var = statistics.fmean(tokens), statistics.variance(tokens)
    return torch.tensor([[(centred[i] - mean) / math.sqrt(var + 1e-8) if m else 0.0 for m in mrow]
                         for i, mrow in enumerate(masks)], dtype=torch.float64)


def baseline_batch():
    torch.manual_seed(3)
    mask = (torch.arange(6) < torch.tensor([6, 2, 5, 3, 6, 4, 1, 5, 3]).unsqueeze(1)).float()
    rewards = torch.randn(9, 6) * 0.1 * mask  # a per-token KL term ...
    rewards[:, 0] += torch.tensor([1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 1.5, 0.0, 3.0])  # ... plus an outcome
    return rewards, mask, [7, 7, 7, 2, 2, 2, 5, 5, 9]  # group 9 has one sample: no baseline (verl)


def test_reinforce_pp_baseline_is_verls_formula():
    rewards, mask, groups = baseline_batch()
    ours, returns = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](rewards, mask, group_ids=torch.tensor(groups))
    assert ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"].needs["groups"]
    assert torch.allclose(ours.double(), reinforce_pp_baseline_loops(rewards, mask, groups), atol=1e-6)
    assert torch.equal(ours, returns) and float(ours[mask.bool()].std()) == pytest.approx(1.0, abs=1e-5)
    grpo, _ = ADVANTAGE_ESTIMATORS["grpo"](rewards, mask, group_ids=torch.tensor(groups))
    assert (ours - grpo).abs().max() > 0.1


def test_reinforce_pp_baseline_equals_verl():
    """Runs where verl imports (it needs ray, tensordict, omegaconf, codetiming ...; not a
    dependency here): verl's own function on the same tensors."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    import numpy as np

    rewards, mask, groups = baseline_batch()
    theirs, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        rewards.clone(), mask.clone(), index=np.array(groups))
    ours, _ = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](rewards, mask, group_ids=torch.tensor(groups))
    assert torch.allclose(ours, theirs.float(), atol=1e-6)


def test_reinforce_pp_baseline_whitens_over_every_process():
    rewards, mask, groups = baseline_batch()
    rewards[5:] *= 3.0
    estimator, ids = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"], torch.tensor(groups)
    whole, _ = estimator(rewards, mask, group_ids=ids)
    halves = [(rewards[:6], mask[:6], ids[:6]), (rewards[6:], mask[6:], ids[6:])]  # groups stay whole
    alone = torch.cat([estimator(r, m, group_ids=g)[0] for r, m, g in halves])
    assert (alone - whole).abs().max() > 0.3
    parts = as_processes(lambda shard, reduce: estimator(shard[0], shard[1], group_ids=shard[2], all_reduce=reduce)[0],
                         halves)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


# ------------------------------------------------------------------ one-step runs of the new settings


def test_reinforce_pp_baseline_config_runs(run_here, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "reinforce_pp_baseline.yaml"),
                      *tiny_args(tiny_model_dir, out, "--max_steps", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "advantage_estimator: reinforce_pp_baseline" in (out / "config.yaml").read_text()
    row = read_metrics(out)[0]
    assert math.isfinite(row["policy_loss"]) and math.isfinite(row["kl"]) and lora_b_norm(out / "final") > 0


def test_trls_normalize_then_sum_runs_and_logs_each_function(run_here, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "grpo.yaml"), *tiny_args(
        tiny_model_dir, out, "--max_steps", "1", "--multi_objective_aggregation", "normalize_then_sum",
        "--reward_funcs", f"{ROOT / 'tests' / 'fixtures' / 'rewards.py'}:char_diversity", "length",
        "--reward_weights", "1.0", "0.5"))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (out / "config.yaml").read_text()
    assert "reward_aggregation: normalize_then_sum" in saved and "scale_rewards: batch" in saved
    row = read_metrics(out)[0]
    for name in ("char_diversity", "length"):
        assert math.isfinite(row[f"rewards/{name}/mean"]) and math.isfinite(row[f"advantages/{name}/std"])
    assert math.isfinite(row["policy_loss"]) and lora_b_norm(out / "final") > 0
