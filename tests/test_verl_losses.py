"""GMPO, Clip-Cov, KL-Cov and DPPO (rlhf.algorithms.verl_losses): against plain-Python references
written from the papers (always), against verl's own functions on the same tensors (where verl's
core_algos imports: a test-only extra, skipped otherwise), and their configs through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from conftest import ROOT, assert_one_line_error, tiny_args
from rlhf import algorithms as A
from rlhf.config import RLConfig
from rlhf.errors import ConfigError
from test_train_e2e import lora_b_norm, read_metrics

METHODS = ("gmpo", "clip_cov", "kl_cov", "dppo")
LENGTHS = [6, 3, 5, 1, 4]  # every row holds a real token: verl's GMPO averages over all rows
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def batch(seed: int = 0, spread: float = 0.3, T: int = 6) -> tuple[torch.Tensor, ...]:
    """logprobs, old_logprobs (real log-probabilities, < 0), advantages, mask: [5, T] float32."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(len(LENGTHS), T, generator=g) * 3 - 0.01
    logprobs = (old + spread * torch.randn(len(LENGTHS), T, generator=g)).clamp(max=-1e-3)
    advantages = torch.randn(len(LENGTHS), T, generator=g)
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).float()
    return logprobs, old, advantages, mask


def run(name: str, logprobs, old, advantages, mask, **kwargs):
    """(loss, d loss / d logprobs, stats) of the registered loss."""
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = A.POLICY_LOSSES[name](lp, old, advantages, mask, **kwargs)
    loss.backward()
    return loss.detach(), lp.grad, stats


# ------------------------------------------------------------------ plain-Python references


def rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t.double()]


def agg_weights(mask: list[list[float]], mode: str, norm_length: int | None) -> list[list[float]]:
    """d(aggregate)/d(per-token loss) of each real token (the aggregation is linear in the losses)."""
    lengths = [sum(row) for row in mask]
    sequences = sum(1 for n in lengths if n > 0)
    out = []
    for row, n in zip(mask, lengths):
        if mode == "token-mean":
            w = 1.0 / sum(lengths)
        elif mode == "seq-mean-token-mean":
            w = 1.0 / (n * sequences) if n else 0.0
        elif mode == "seq-mean-token-sum":
            w = 1.0 / sequences
        else:
            w = 1.0 / (sequences * norm_length)
        out.append([w * m for m in row])
    return out


def aggregate(per_token, weights) -> float:
    return sum(l * w for lrow, wrow in zip(per_token, weights) for l, w in zip(lrow, wrow))


def ref_gmpo(logprobs, old, advantages, mask, clip_range=0.4, clip_range_high=None,
             loss_agg_mode="seq-mean-token-mean", norm_length=None):
    """The paper's objective: -A_i * exp(mean_t of the sign-aware clipped log-ratio) per response."""
    high = clip_range if clip_range_high is None else clip_range_high
    lp, o, adv, m = rows(logprobs), rows(old), rows(advantages), rows(mask)
    weights = agg_weights(m, loss_agg_mode, norm_length)
    per_token, grad = [], []
    for i, row in enumerate(m):
        n = sum(row)
        terms, free = [], []
        for t, real in enumerate(row):
            x = lp[i][t] - o[i][t]
            a = adv[i][t]
            # A > 0: a ratio above e^high stops helping; A < 0: one below e^-low stops; A = 0: no term
            bounded = min(x, high) if a > 0 else max(x, -clip_range) if a < 0 else 0.0
            terms.append(bounded * real)
            free.append(real and a != 0 and bounded == x)
        s = math.exp(sum(terms) / n)
        a_seq = sum(a * r for a, r in zip(adv[i], row)) / n
        per_token.append([-a_seq * s] * len(row))
        row_weight = sum(weights[i])  # the row's loss sits on each of its tokens
        grad.append([row_weight * -a_seq * s / n if f else 0.0 for f in free])
    return aggregate(per_token, weights), grad


def ppo_token(x: float, a: float, low: float, high: float) -> tuple[float, float, bool]:
    """PPO-clip per token: (loss, d loss / d lp, clipped) for log-ratio x and advantage a."""
    r = math.exp(x)
    unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
    if clipped > unclipped:
        return clipped, 0.0, True
    return unclipped, -a * r, False


def covariances(lp, adv, m) -> dict[tuple[int, int], float]:
    real = [(i, t) for i, row in enumerate(m) for t, v in enumerate(row) if v]
    mean_a = sum(adv[i][t] for i, t in real) / len(real)
    mean_l = sum(lp[i][t] for i, t in real) / len(real)
    return {(i, t): (adv[i][t] - mean_a) * (lp[i][t] - mean_l) for i, t in real}


def ref_clip_cov(logprobs, old, advantages, mask, detached, clip_range=0.2, clip_range_high=None,
                 loss_agg_mode="token-mean", norm_length=None):
    """PPO-clip per token, with the tokens in ``detached`` contributing neither loss nor gradient."""
    high = clip_range if clip_range_high is None else clip_range_high
    lp, o, adv, m = rows(logprobs), rows(old), rows(advantages), rows(mask)
    weights = agg_weights(m, loss_agg_mode, norm_length)
    per_token = [[0.0] * len(r) for r in m]
    grad = [[0.0] * len(r) for r in m]
    for i, row in enumerate(m):
        for t, real in enumerate(row):
            if real and (i, t) not in detached:
                loss, d, _ = ppo_token(lp[i][t] - o[i][t], adv[i][t], clip_range, high)
                per_token[i][t], grad[i][t] = loss, weights[i][t] * d
    return aggregate(per_token, weights), grad


def clip_cov_candidates(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=None, lb=1.0,
                        ub=5.0) -> list[tuple[int, int]]:
    """Real tokens PPO did not clip whose covariance lies in (lb, ub), row-major."""
    high = clip_range if clip_range_high is None else clip_range_high
    lp, o, adv, m = rows(logprobs), rows(old), rows(advantages), rows(mask)
    cov = covariances(lp, adv, m)
    return [(i, t) for (i, t), c in cov.items()
            if lb < c < ub and not ppo_token(lp[i][t] - o[i][t], adv[i][t], clip_range, high)[2]]


def ref_kl_cov(logprobs, old, advantages, mask, kl_cov_ratio=2e-3, ppo_kl_coef=1.0, loss_agg_mode="token-mean",
               norm_length=None):
    """-A r on every token, + coef |lp - old| on the k tokens of largest covariance."""
    lp, o, adv, m = rows(logprobs), rows(old), rows(advantages), rows(mask)
    weights = agg_weights(m, loss_agg_mode, norm_length)
    cov = covariances(lp, adv, m)
    k = max(1, int(len(cov) * kl_cov_ratio))
    chosen = set(sorted(cov, key=cov.get, reverse=True)[:k])
    per_token = [[0.0] * len(r) for r in m]
    grad = [[0.0] * len(r) for r in m]
    for i, t in cov:
        x = lp[i][t] - o[i][t]
        penalty = ppo_kl_coef if (i, t) in chosen else 0.0
        per_token[i][t] = -adv[i][t] * math.exp(x) + penalty * abs(x)
        grad[i][t] = weights[i][t] * (-adv[i][t] * math.exp(x) + penalty * math.copysign(1.0, x))
    return aggregate(per_token, weights), grad, chosen


def ref_dppo(logprobs, old, advantages, mask, divergence="tv", clip_range=None, clip_range_high=None, ratio_cap=20.0,
             loss_agg_mode="token-mean", norm_length=None):
    """The paper's masked, truncated importance-sampled policy gradient: -A min(r, cap) lp on kept tokens."""
    low = {"tv": 0.15, "binary_kl": 0.05}[divergence] if clip_range is None else clip_range
    high = low if clip_range_high is None else clip_range_high
    lp, o, adv, m = rows(logprobs), rows(old), rows(advantages), rows(mask)
    weights = agg_weights(m, loss_agg_mode, norm_length)
    per_token = [[0.0] * len(r) for r in m]
    grad = [[0.0] * len(r) for r in m]
    masked = set()
    for i, row in enumerate(m):
        for t, real in enumerate(row):
            if not real:
                continue
            p, q, a = math.exp(lp[i][t]), math.exp(o[i][t]), adv[i][t]
            if divergence == "tv":
                too_far = p - q > high if a > 0 else p - q < -low
            else:
                d = q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
                too_far = (d > high and p > q) if a > 0 else (d > low and p < q)
            if too_far:
                masked.add((i, t))
                continue
            w = min(math.exp(lp[i][t] - o[i][t]), ratio_cap)
            per_token[i][t] = -a * w * lp[i][t]
            grad[i][t] = weights[i][t] * -a * w
    return aggregate(per_token, weights), grad, masked


def assert_matches(loss, grad, ref_loss, ref_grad, atol=2e-6):
    assert float(loss) == pytest.approx(ref_loss, abs=atol, rel=1e-5)
    assert torch.allclose(grad.double(), torch.tensor(ref_grad, dtype=torch.float64), atol=atol, rtol=1e-5), \
        (grad, ref_grad)


# ------------------------------------------------------------------ against the references


@pytest.mark.parametrize("mode", MODES)
def test_gmpo_equals_the_geometric_mean_objective(mode):
    logprobs, old, adv, mask = batch(seed=1, spread=0.5)  # wide enough that some tokens leave the band
    adv[1] = 0.7  # a GRPO-like row-constant advantage beside per-token ones
    loss, grad, stats = run("gmpo", logprobs, old, adv, mask, loss_agg_mode=mode, norm_length=8)
    ref_loss, ref_grad = ref_gmpo(logprobs, old, adv, mask, loss_agg_mode=mode, norm_length=8)
    assert_matches(loss, grad, ref_loss, ref_grad)
    assert 0.0 < stats["clip_frac"] < 1.0


def test_gmpo_clips_only_on_the_side_the_advantage_pushes():
    old = torch.full((3, 3), -1.0)
    logprobs = old + torch.tensor([[0.9, -0.9, 0.1]] * 3)  # above, below, inside [-0.4, 0.4]
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3, [0.0] * 3])
    loss, grad, stats = run("gmpo", logprobs, old, adv, torch.ones(3, 3))
    # A > 0: the rise is capped at 0.4, the fall counts; A < 0: the fall is capped at -0.4, the rise counts
    s_pos, s_neg = math.exp((0.4 - 0.9 + 0.1) / 3), math.exp((0.9 - 0.4 + 0.1) / 3)
    assert float(loss) == pytest.approx((-s_pos + s_neg + 0.0) / 3, abs=1e-6)
    assert grad[0, 0] == 0 and grad[0, 1] != 0 and grad[1, 1] == 0 and grad[1, 0] != 0
    assert float(grad[2].abs().max()) == 0.0  # A = 0: no signal, and no token counts as clipped
    assert stats["clip_frac"] == pytest.approx(2 / 9)


@pytest.mark.parametrize("mode", MODES)
def test_clip_cov_is_ppo_clip_with_the_drawn_tokens_detached(mode):
    logprobs, old, adv, mask = batch(seed=4, spread=0.2)
    ppo = {"clip_range": 0.1, "clip_range_high": 0.15}
    candidates = clip_cov_candidates(logprobs, old, adv, mask, **ppo, lb=0.5, ub=3.0)
    assert len(candidates) == 4  # the data exercise the selection (and 3 tokens are PPO-clipped)
    # clip_cov_ratio 1: every candidate is detached, so the draw cannot matter
    loss, grad, stats = run("clip_cov", logprobs, old, adv, mask, **ppo, clip_cov_ratio=1.0, clip_cov_lb=0.5,
                            clip_cov_ub=3.0, loss_agg_mode=mode, norm_length=8)
    ref_loss, ref_grad = ref_clip_cov(logprobs, old, adv, mask, set(candidates), **ppo, loss_agg_mode=mode,
                                      norm_length=8)
    assert_matches(loss, grad, ref_loss, ref_grad)
    assert stats["clip_cov/selected_frac"] == pytest.approx(4 / float(mask.sum()))
    assert stats["clip_frac"] == pytest.approx(3 / float(mask.sum()))


def test_clip_cov_draws_max_1_floor_ratio_tokens_among_the_candidates():
    logprobs, old, adv, mask = batch(seed=4, spread=0.2)
    candidates = set(clip_cov_candidates(logprobs, old, adv, mask))
    tokens = int(mask.sum())  # 19
    assert len(candidates) == 3
    drawn = []
    for seed, ratio, expected in [(0, 2e-4, 1), (1, 0.11, 2), (1, 0.11, 2)]:  # the last repeats the second's seed
        torch.manual_seed(seed)
        loss, grad, stats = run("clip_cov", logprobs, old, adv, mask, clip_cov_ratio=ratio)
        zero = {(i, t) for i, t in candidates if grad[i, t] == 0}
        assert len(zero) == expected and stats["clip_cov/selected_frac"] == pytest.approx(expected / tokens)
        ref_loss, ref_grad = ref_clip_cov(logprobs, old, adv, mask, zero)
        assert_matches(loss, grad, ref_loss, ref_grad)
        drawn.append(zero)
    assert drawn[1] == drawn[2]  # the same seed draws the same tokens


@pytest.mark.parametrize("mode", MODES)
def test_kl_cov_penalises_the_tokens_of_largest_covariance(mode):
    logprobs, old, adv, mask = batch(seed=3, spread=0.3)
    for ratio in (2e-3, 0.25):  # 1 token (the floor), then 4 of 19
        loss, grad, stats = run("kl_cov", logprobs, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=0.5,
                                loss_agg_mode=mode, norm_length=8)
        ref_loss, ref_grad, chosen = ref_kl_cov(logprobs, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=0.5,
                                                loss_agg_mode=mode, norm_length=8)
        assert_matches(loss, grad, ref_loss, ref_grad)
        assert stats["kl_cov/selected_frac"] == pytest.approx(len(chosen) / float(mask.sum()))


@pytest.mark.parametrize("divergence, thresholds", [("tv", {}), ("binary_kl", {}),  # the paper's 0.15, 0.05
                                                     ("tv", {"clip_range": 0.1, "clip_range_high": 0.05}),
                                                     ("binary_kl", {"clip_range": 0.04, "clip_range_high": 0.02})])
@pytest.mark.parametrize("mode", MODES)
def test_dppo_masks_tokens_whose_probability_left_the_trust_region(divergence, thresholds, mode):
    logprobs, old, adv, mask = batch(seed=9, spread=0.6)  # each bound decides some token here
    loss, grad, stats = run("dppo", logprobs, old, adv, mask, divergence=divergence, **thresholds, ratio_cap=1.5,
                            loss_agg_mode=mode, norm_length=8)
    ref_loss, ref_grad, masked = ref_dppo(logprobs, old, adv, mask, divergence=divergence, **thresholds,
                                          ratio_cap=1.5, loss_agg_mode=mode, norm_length=8)
    assert_matches(loss, grad, ref_loss, ref_grad)
    assert 0 < len(masked) < mask.sum() and stats["clip_frac"] == pytest.approx(len(masked) / float(mask.sum()))
    assert stats["dppo/truncated_frac"] > 0  # some kept ratio exceeded the cap of 1.5


def test_dppo_masks_only_the_move_the_advantage_pushes():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    logprobs = torch.log(torch.tensor([[0.8, 0.2], [0.8, 0.2]]))  # +0.3 and -0.3 in probability
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    _, grad, stats = run("dppo", logprobs, old, adv, torch.ones(2, 2))  # TV threshold 0.15
    # A > 0: the rise is out of the region, the fall is not; A < 0: the reverse
    assert grad[0, 0] == 0 and grad[0, 1] != 0 and grad[1, 1] == 0 and grad[1, 0] != 0
    assert stats["clip_frac"] == 0.5


def test_dppo_with_the_rollout_policy_itself_is_the_policy_gradient():
    """One update per rollout: old = lp, nothing is masked and the gradient is pg's."""
    logprobs, _, adv, mask = batch(seed=5)
    _, grad_dppo, stats = run("dppo", logprobs, logprobs, adv, mask, divergence="binary_kl")
    _, grad_pg, _ = run("pg", logprobs, logprobs, adv, mask)
    assert torch.allclose(grad_dppo, grad_pg, atol=1e-7) and stats["clip_frac"] == 0.0


def test_covariance_selection_is_per_call():
    """The trainer calls a loss per micro-batch: KL-Cov's floor of one token applies to each call,
    so two halves penalise two tokens where the whole batch penalises one (as in verl)."""
    logprobs, old, adv, mask = batch(seed=3)
    whole = A.POLICY_LOSSES["kl_cov"](logprobs, old, adv, mask)[1]["kl_cov/selected_frac"] * mask.sum()
    halves = sum(A.POLICY_LOSSES["kl_cov"](logprobs[s], old[s], adv[s], mask[s])[1]["kl_cov/selected_frac"]
                 * mask[s].sum() for s in (slice(0, 2), slice(2, 5)))
    assert (round(float(whole)), round(float(halves))) == (1, 2)


def test_token_weights_multiply_the_per_token_loss():
    logprobs, old, adv, mask = batch(seed=6)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
    for name in ("kl_cov", "dppo"):
        plain = run(name, logprobs, old, adv, mask)[1]
        weighted = run(name, logprobs, old, adv, mask, token_weights=weights)[1]
        assert torch.allclose(weighted, plain * weights, atol=1e-7), name


# ------------------------------------------------------------------ bad hyperparameters


@pytest.mark.parametrize("name, kwargs, fragment", [
    ("gmpo", {"clip_range": 0.0}, "must be > 0"),
    ("clip_cov", {"clip_cov_ratio": 0.0}, "clip_cov_ratio"),
    ("clip_cov", {"clip_cov_lb": 5.0, "clip_cov_ub": 1.0}, "clip_cov_lb must be below clip_cov_ub"),
    ("kl_cov", {"kl_cov_ratio": 1.5}, "kl_cov_ratio"),
    ("kl_cov", {"ppo_kl_coef": -1.0}, "ppo_kl_coef"),
    ("dppo", {"divergence": "js"}, "tv, binary_kl"),
    ("dppo", {"clip_range_high": -0.1}, "divergence thresholds"),
    ("dppo", {"ratio_cap": 0.5}, "ratio_cap"),
])
def test_impossible_hyperparameters_are_refused_in_one_line(name, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        A.POLICY_LOSSES[name](*batch()[:3], batch()[3], **kwargs)
    with pytest.raises(ConfigError, match=fragment):
        RLConfig(policy_loss=name, policy_loss_kwargs=kwargs)


def test_cli_refuses_an_unknown_dppo_divergence(run_here, tiny_model_dir, tmp_path):
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / "dppo.yaml"),
                      *tiny_args(tiny_model_dir, tmp_path / "run", "--policy_loss_kwargs", '{"divergence": "js"}'))
    assert_one_line_error(result, "policy_loss_kwargs", "dppo", "tv, binary_kl")


# ------------------------------------------------------------------ against verl's own functions


@pytest.fixture(scope="module")
def verl():
    """verl.trainer.ppo.core_algos where it imports on CPU (needs ray, tensordict, omegaconf, ...;
    never a GPU package), and a function building its ActorConfig."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    def config(loss_mode: str, clip: float, clip_high: float | None = None, clip_ratio_c: float = 3.0, **policy_loss):
        return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=clip,
                           clip_ratio_low=clip, clip_ratio_high=clip if clip_high is None else clip_high,
                           clip_ratio_c=clip_ratio_c, policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss))

    return core_algos, config


def verl_run(fn, logprobs, old, advantages, mask, mode, config):
    lp = logprobs.clone().requires_grad_(True)
    loss, metrics = fn(old, lp, advantages, mask, mode, config)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("mode", MODES)
def test_equal_to_verl(verl, mode):
    core, config = verl
    T = 6
    logprobs, old, adv, mask = batch(seed=7, spread=0.5, T=T)
    cases = [  # (ours, our kwargs, verl's function, verl's config)
        ("gmpo", {"clip_range": 0.4, "clip_range_high": 0.3}, core.compute_policy_loss_geo_mean,
         config("geo_mean", 0.4, 0.3)),
        ("clip_cov", {"clip_range": 0.2, "clip_range_high": 0.28, "clip_cov_ratio": 0.2, "clip_cov_lb": -0.25,
                      "clip_cov_ub": 1.0}, core.compute_policy_loss_clip_cov,  # 3 drawn of 8 candidates
         config("clip_cov", 0.2, 0.28, clip_cov_ratio=0.2, clip_cov_lb=-0.25, clip_cov_ub=1.0)),
        ("kl_cov", {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.7}, core.compute_policy_loss_kl_cov,
         config("kl_cov", 0.2, kl_cov_ratio=0.2, ppo_kl_coef=0.7)),
        ("dppo", {"divergence": "tv", "clip_range": 0.1, "clip_range_high": 0.12, "ratio_cap": 1.5},
         core.compute_policy_loss_dppo_tv, config("dppo_tv", 0.1, 0.12, clip_ratio_c=1.5)),
        ("dppo", {"divergence": "binary_kl", "clip_range": 0.03, "clip_range_high": 0.05, "ratio_cap": 1.5},
         core.compute_policy_loss_dppo_kl, config("dppo_kl", 0.03, 0.05, clip_ratio_c=1.5)),
    ]
    for name, kwargs, fn, cfg in cases:
        if name == "gmpo" and mode != "seq-mean-token-mean":
            continue  # verl's GMPO takes the mean over responses whatever the mode
        torch.manual_seed(11)  # Clip-Cov draws its tokens from torch's generator in both
        # verl's seq-mean-token-sum-norm divides by the padded width T: our norm_length
        loss, grad, stats = run(name, logprobs, old, adv, mask, **kwargs, loss_agg_mode=mode, norm_length=T)
        torch.manual_seed(11)
        verl_loss, verl_grad, metrics = verl_run(fn, logprobs, old, adv, mask, mode, cfg)
        assert float(loss) == pytest.approx(float(verl_loss), abs=1e-6, rel=1e-5), (name, kwargs)
        assert torch.allclose(grad, verl_grad, atol=1e-6, rtol=1e-5), (name, kwargs)
        if name == "clip_cov":
            assert stats["clip_cov/selected_frac"] == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
            assert stats["clip_cov/selected_frac"] > 0
        if name == "dppo":
            assert stats["clip_frac"] == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
            assert stats["dppo/truncated_frac"] == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-6)
            assert 0 < stats["clip_frac"] < 1


# ------------------------------------------------------------------ configs through the CLI


@pytest.mark.parametrize("name, own_stat", [("gmpo", "clip_frac"), ("clip_cov", "clip_cov/selected_frac"),
                                            ("kl_cov", "kl_cov/selected_frac"), ("dppo", "dppo/truncated_frac")])
def test_config_runs_one_step(run_here, tiny_model_dir, tmp_path, name, own_stat):
    out = tmp_path / name
    result = run_here("train_grpo.py", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                      *tiny_args(tiny_model_dir, out, "--max_steps", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    settings = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["policy_loss"] == name and saved["policy_loss_kwargs"] == settings.get("policy_loss_kwargs", {})
    [row] = read_metrics(out)
    for key in ("policy_loss", "clip_frac", own_stat):
        assert math.isfinite(row[key]), key
    assert lora_b_norm(out / "final") > 0
