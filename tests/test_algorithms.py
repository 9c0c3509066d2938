"""Unit tests of rlhf.algorithms against hand-computed numbers and independent Python loops."""

import inspect
import math

import pytest
import torch

from rlhf import algorithms as A

# A batch whose middle row is padded: lengths 3, 1, 2.
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)


def close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"{actual} != {expected}"


# ---------------------------------------------------------------------------- python references


def py_returns(rewards, mask, gamma):
    out = []
    for r_row, m_row in zip(rewards, mask):
        g, row = 0.0, [0.0] * len(r_row)
        for t in reversed(range(len(r_row))):
            g = r_row[t] * m_row[t] + gamma * g
            row[t] = g * m_row[t]
        out.append(row)
    return out


def py_gae(rewards, values, mask, gamma, lam):
    advs, rets = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        n = int(sum(m_row))  # real tokens are a prefix of the row
        a_row = [0.0] * len(r_row)
        last = 0.0
        for t in reversed(range(n)):
            next_v = v_row[t + 1] if t + 1 < n else 0.0
            delta = r_row[t] + gamma * next_v - v_row[t]
            last = delta + gamma * lam * last
            a_row[t] = last
        advs.append(a_row)
        rets.append([a_row[t] + (v_row[t] if t < n else 0.0) for t in range(len(r_row))])
    return advs, rets


def random_batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 2, 5, 1, 4])[:B]
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    return rewards, values, mask


# ---------------------------------------------------------------------------- signatures


SIGNATURES = {
    "masked_mean": "(x, mask, dim=None)",
    "masked_var": "(x, mask, unbiased=True)",
    "masked_whiten": "(x, mask, shift_mean=True, eps=1e-08, all_reduce=None)",
    "agg_loss": "(loss, mask, mode='token-mean', norm_length=None)",
    "token_level_rewards": "(scores, mask, kl=None, kl_coef=0.0)",
    "entropy_from_logits": "(logits)",
    "logprobs_from_logits": "(logits, labels)",
    "logprobs_and_entropy_from_logits": "(logits, labels)",
    "conjugate_gradient": "(Avp, b, iters=10, residual_tol=1e-10)",
    "trpo_step_size": "(step_dir, Avp_of_step_dir, max_kl)",
}


@pytest.mark.parametrize("name,params", SIGNATURES.items())
def test_public_signatures(name, params):
    parameters = inspect.signature(getattr(A, name)).parameters.values()
    rendered = ", ".join(
        p.name + ("" if p.default is inspect.Parameter.empty else "=" + repr(p.default)) for p in parameters
    )
    assert f"({rendered})" == params


def test_prefix_signatures_of_extended_functions():
    kl_params = list(inspect.signature(A.kl_penalty).parameters)
    assert kl_params[:3] == ["logprobs", "ref_logprobs", "estimator"]
    vl = inspect.signature(A.value_loss).parameters
    assert list(vl)[:6] == ["values", "old_values", "returns", "mask", "clip_range", "loss_agg_mode"]
    assert vl["clip_range"].default == 0.2
    ls = inspect.signature(A.backtracking_line_search).parameters
    assert list(ls)[:6] == ["f", "x0", "full_step", "expected_improve", "max_backtracks", "accept_ratio"]
    assert ls["max_backtracks"].default == 10 and ls["accept_ratio"].default == 0.1


def test_registered_functions_share_only_their_positional_inputs():
    """Positional: what every estimator / loss reads; the rest is keyword-only and named by need."""
    for registry, positional in ((A.ADVANTAGE_ESTIMATORS, ["token_rewards", "mask"]),
                                 (A.POLICY_LOSSES, ["logprobs", "old_logprobs", "advantages", "mask"])):
        for name, entry in registry.items():
            params = inspect.signature(entry.fn).parameters
            assert list(params)[:len(positional)] == positional, name
            assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[len(positional):]), name
    assert set(A.ADVANTAGE_ESTIMATORS) >= {"reinforce", "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    assert set(A.POLICY_LOSSES) >= {"pg", "ppo_clip"}
    assert A.ADVANTAGE_ESTIMATORS["gae"].hyperparameters == {"gamma": 1.0, "lam": 0.95}
    assert A.POLICY_LOSSES["ppo_clip"].hyperparameters == {"clip_range": 0.2, "clip_range_high": None, "dual_clip": None,
                                                           "delta": None, "importance_sampling_level": "token"}


def test_unknown_registry_names_list_valid_ones():
    with pytest.raises(ValueError, match="gae.*grpo"):
        A.ADVANTAGE_ESTIMATORS["vtrace"]
    with pytest.raises(ValueError, match="ppo_clip"):
        A.POLICY_LOSSES["sac"]
    with pytest.raises(ValueError, match="k3"):
        A.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k9")
    with pytest.raises(ValueError, match="token-mean"):
        A.agg_loss(torch.zeros(1, 1), torch.ones(1, 1), "sum")


def test_every_public_function_documents_shapes_and_formula():
    names = list(SIGNATURES) + ["kl_penalty", "value_loss", "backtracking_line_search"]
    fns = [getattr(A, n) for n in names] + list(A.ADVANTAGE_ESTIMATORS.values()) + list(A.POLICY_LOSSES.values())
    for fn in fns:
        doc = fn.__doc__ or ""
        assert "[" in doc and "=" in doc, fn.__name__


# ---------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(A.masked_mean(x, mask), 7 / 3)
    close(A.masked_mean(x, mask, dim=-1), [1.5, 4.0])
    # entries 1, 2, 4: squared deviations sum to 14/3
    close(A.masked_var(x, mask), 7 / 3)
    close(A.masked_var(x, mask, unbiased=False), 14 / 9)


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    sd = math.sqrt(7 / 3 + 1e-8)
    expected = [[(1 - 7 / 3) / sd, (2 - 7 / 3) / sd, 0.0], [(4 - 7 / 3) / sd, 0.0, 0.0]]
    close(A.masked_whiten(x, mask), expected)
    expected_keep_mean = [[expected[0][0] + 7 / 3, expected[0][1] + 7 / 3, 0.0], [expected[1][0] + 7 / 3, 0.0, 0.0]]
    close(A.masked_whiten(x, mask, shift_mean=False), expected_keep_mean)


def test_agg_loss_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    # every row's masked sum is 10; lengths 4, 1, 2
    close(A.agg_loss(loss, mask, "token-mean"), 30 / 7)
    close(A.agg_loss(loss, mask, "seq-mean-token-mean"), (10 / 4 + 10 / 1 + 10 / 2) / 3)
    close(A.agg_loss(loss, mask, "seq-mean-token-sum"), 10.0)
    close(A.agg_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=4), 30 / (3 * 4))
    close(A.agg_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=10), 1.0)
    with pytest.raises(ValueError, match="norm_length"):  # the padded width is no constant (issue 16)
        A.agg_loss(loss, mask, "seq-mean-token-sum-norm")


def test_agg_modes_weight_tokens_differently_for_unequal_lengths():
    # One long sequence of loss 1 per token and one short sequence of loss 1 per token.
    loss = torch.ones(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    grads = {}
    for mode in A.LOSS_AGG_MODES:
        per_token = loss.clone().requires_grad_(True)
        A.agg_loss(per_token, mask, mode, norm_length=4).backward()
        grads[mode] = per_token.grad
    # token-mean: every token weighs 1/5; seq-mean-token-mean: a short sequence's token weighs more
    close(grads["token-mean"][0, 0], 1 / 5)
    close(grads["token-mean"][1, 0], 1 / 5)
    close(grads["seq-mean-token-mean"][0, 0], 1 / 8)
    close(grads["seq-mean-token-mean"][1, 0], 1 / 2)
    close(grads["seq-mean-token-sum"][0, 0], 1 / 2)
    close(grads["seq-mean-token-sum-norm"][1, 0], 1 / 8)
    assert grads["token-mean"][1, 1] == 0  # padding never gets gradient


# ---------------------------------------------------------------------------- KL and rewards


def test_kl_estimators_by_hand():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    close(A.kl_penalty(lp, ref, "k1"), [[0.5, -1.0]])
    close(A.kl_penalty(lp, ref, "k2"), [[0.125, 0.5]])
    close(A.kl_penalty(lp, ref, "k3"), [[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2.0]])
    close(A.kl_penalty(lp, ref, "k3", mask=torch.tensor([[1, 0]])), [[math.exp(-0.5) + 0.5 - 1, 0.0]])


def test_k3_is_nonnegative_and_finite():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(64, 32, generator=g) * 30
    ref = torch.randn(64, 32, generator=g) * 30
    kl = A.kl_penalty(lp, ref, "k3")
    assert torch.isfinite(kl).all() and (kl >= 0).all()


def test_token_level_rewards_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    expected = [[-0.05, -0.1, -0.15 + 1.0], [-0.2 + 2.0, 0.0, 0.0], [-0.35, -0.4 + 3.0, 0.0]]
    close(A.token_level_rewards(scores, MASK, kl=kl, kl_coef=0.5), expected)
    close(A.token_level_rewards(scores, MASK), [[0, 0, 1.0], [2.0, 0, 0], [0, 3.0, 0]])


def test_kl_controllers():
    fixed = A.FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    adaptive = A.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    adaptive.update(9.0, 100)  # error 0.5 clipped to 0.2
    assert adaptive.value == pytest.approx(0.2 * 1.002)
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.2 * 1.002 * 0.999)
    restored = A.AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_moving_average_baseline():
    baseline = A.MovingAverageBaseline(decay=0.9)
    assert baseline.value == 0.0
    baseline.update(torch.tensor([1.0, 3.0]))
    assert baseline.value == pytest.approx(2.0)
    baseline.update([4.0])
    assert baseline.value == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    with pytest.raises(ValueError):
        A.MovingAverageBaseline(decay=1.0)


# ---------------------------------------------------------------------------- advantage estimators


def test_reinforce_by_hand_with_gamma_and_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 7.0, 7.0], [0.0, 3.0, 9.0]])  # 7s and 9 are padding
    adv, ret = A.ADVANTAGE_ESTIMATORS["reinforce"](rewards, MASK, gamma=0.9, baseline=0.5)
    close(ret, [[0.81, 0.9, 1.0], [2.0, 0, 0], [2.7, 3.0, 0]])
    close(adv, [[0.31, 0.4, 0.5], [1.5, 0, 0], [2.2, 2.5, 0]])


def test_reinforce_matches_python_loop():
    rewards, _, mask = random_batch()
    adv, ret = A.ADVANTAGE_ESTIMATORS["reinforce"](rewards, mask, gamma=0.7, baseline=0.3)
    expected = py_returns(rewards.tolist(), mask.tolist(), 0.7)
    close(ret, expected, 1e-5)
    close(adv, (torch.tensor(expected) - 0.3) * mask, 1e-5)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = A.ADVANTAGE_ESTIMATORS["gae"](rewards, mask, values=values, gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3], [1.048, 1.4, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [1.548, 2.0, 0.0]])


def test_gae_matches_python_loop_and_requires_values():
    rewards, values, mask = random_batch(seed=3)
    adv, ret = A.ADVANTAGE_ESTIMATORS["gae"](rewards, mask, values=values, gamma=0.95, lam=0.9)
    exp_adv, exp_ret = py_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.95, 0.9)
    close(adv, exp_adv, 1e-5)
    close(ret, exp_ret, 1e-5)
    with pytest.raises(ValueError, match="values"):
        A.ADVANTAGE_ESTIMATORS["gae"](rewards, mask)


def test_gae_with_lambda_one_is_returns_minus_values():
    rewards, values, mask = random_batch(seed=4)
    adv, ret = A.ADVANTAGE_ESTIMATORS["gae"](rewards, mask, values=values, gamma=1.0, lam=1.0)
    mc_returns = A.discounted_returns(rewards, mask, 1.0)
    close(adv, (mc_returns - values) * mask, 1e-5)
    close(ret, mc_returns, 1e-5)


# Groups of sizes 3, 2, 1 with interleaved, non-contiguous ids; scores 1,2,3 | 5,7 | 4.
GROUP_IDS = torch.tensor([7, 3, 7, 9, 3, 7])
GROUP_SCORES = torch.tensor([1.0, 5.0, 2.0, 4.0, 7.0, 3.0])
GROUP_MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.float32)


def group_rewards():
    return A.token_level_rewards(GROUP_SCORES, GROUP_MASK)


def test_grpo_by_hand():
    adv, ret = A.ADVANTAGE_ESTIMATORS["grpo"](group_rewards(), GROUP_MASK, group_ids=GROUP_IDS)
    eps = 1e-6
    s2 = math.sqrt(2.0)
    seq = [-1 / (1 + eps), -1 / (s2 + eps), 0.0, 0.0, 1 / (s2 + eps), 1 / (1 + eps)]
    close(adv, torch.tensor(seq).unsqueeze(1) * GROUP_MASK)
    close(ret, adv)


def test_grpo_zero_mean_per_group():
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    scores = torch.randn(9, generator=g)
    mask = torch.ones(9, 3)
    adv, _ = A.ADVANTAGE_ESTIMATORS["grpo"](A.token_level_rewards(scores, mask), mask, group_ids=ids)
    for gid in ids.unique():
        group = adv[ids == gid, 0]
        assert abs(float(group.mean())) < 1e-6
        assert float(group.std()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_grpo_advantages_do_not_vanish_for_rewards_whose_squares_overflow_float32(scale_rewards):
    """GRPO's advantages do not depend on the rewards' scale. Before: rewards of 1e25 squared past
    float32's range, the std was inf and every advantage silently 0 (measured: [-0, 0, 0, -0])."""
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    scores = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5, 4.0])
    mask = torch.ones(6, 2)
    grpo = A.ADVANTAGE_ESTIMATORS["grpo"]
    unit, _ = grpo(A.token_level_rewards(scores, mask), mask, group_ids=ids, scale_rewards=scale_rewards)
    huge, _ = grpo(A.token_level_rewards(scores * 1e25, mask), mask, group_ids=ids, scale_rewards=scale_rewards)
    assert huge.dtype == torch.float32 and bool(unit.abs().min() > 0.1)
    torch.testing.assert_close(huge, unit, rtol=1e-5, atol=1e-6)
    assert A.group_stats(scores * 1e25, ids)[2].dtype == torch.float32
    if scale_rewards == "batch":  # as the trainer calls it: summed over processes by a float32 reduction
        def float32_sum(tensor):
            return torch.as_tensor(tensor, dtype=torch.float32).clone()

        reduced, _ = grpo(A.token_level_rewards(scores * 1e25, mask), mask, group_ids=ids, scale_rewards="batch",
                          all_reduce=float32_sum)
        torch.testing.assert_close(reduced, unit, rtol=1e-5, atol=1e-6)  # a reviewer: 0 everywhere at 313bc9e


def test_rescaled_advantages_of_equal_huge_rewards_are_those_of_equal_small_ones():
    """A reviewer's, of the float64 fallbacks that came before the power-of-two rescaling: equal
    rewards of 1e26 in a group of 6 got advantages of -0.91 each (the float32 mean's rounding error,
    whitened by itself), masked_whiten -0.97 on every token; and the fallback's float32 scale
    overflowed for values near float32's limit over two processes (NaN). Now they are those of the
    same rewards times a power of two, as equal rewards near 1 get."""
    grpo = A.ADVANTAGE_ESTIMATORS["grpo"]
    mask = torch.ones(6, 2)
    ids = torch.zeros(6, dtype=torch.long)
    huge, _ = grpo(A.token_level_rewards(torch.full((6,), 1e26), mask), mask, group_ids=ids)
    scale = 2.0 ** -87  # 2^87 is the first power of two above 1e26
    small, _ = grpo(A.token_level_rewards(torch.full((6,), 1e26 * scale), mask), mask, group_ids=ids)
    assert torch.equal(huge, small) and float(huge.abs().max()) < 0.1
    padded = torch.ones(4, 5)
    padded[0, 3:] = 0
    whitened = A.masked_whiten(torch.full((4, 5), 1e26), padded)
    assert torch.equal(whitened, A.masked_whiten(torch.full((4, 5), 1e26 * scale), padded))
    assert float(whitened.abs().max()) < 0.01

    def two_processes(tensor):  # each holding the same values: sums double
        return torch.as_tensor(tensor, dtype=torch.float32) * 2

    extreme = A.masked_whiten(torch.tensor([[2e38, -2e38]]), torch.ones(1, 2), all_reduce=two_processes)
    torch.testing.assert_close(extreme, torch.tensor([[0.8660254, -0.8660254]]))  # 4 values ±1: std 2 / sqrt(3)
    mask = torch.ones(2, 2)
    extreme, _ = grpo(A.token_level_rewards(torch.tensor([2e38, -2e38]), mask), mask, group_ids=torch.zeros(2, dtype=torch.long),
                      scale_rewards="batch", all_reduce=two_processes)
    torch.testing.assert_close(extreme[:, 0], torch.tensor([0.8660254, -0.8660254]))


def test_whitening_does_not_zero_entries_whose_squares_overflow_float32():
    """masked_whiten (REINFORCE++, whiten_advantages) is scale-free too. Before: returns of 1e25 gave a
    float32 variance of nan (inf squares, times 0 on padding) and every advantage nan (measured:
    reinforce_pp all nan, a step the trainer skips as non-finite)."""
    returns = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])

    def float32_sum(tensor):  # one process's all_reduce, a float32 reduction as the trainer's
        return torch.as_tensor(tensor, dtype=torch.float32).clone()

    for all_reduce in (None, float32_sum):
        for shift_mean in (True, False):
            unit = A.masked_whiten(returns, mask, shift_mean=shift_mean, all_reduce=all_reduce)
            huge = A.masked_whiten(returns * 1e25, mask, shift_mean=shift_mean, all_reduce=all_reduce)
            assert huge.dtype == torch.float32 and bool(unit[mask.bool()].abs().min() > 0.1)
            expected = unit if shift_mean else (unit - A.masked_mean(returns, mask) * mask) + \
                A.masked_mean(returns * 1e25, mask) * mask
            torch.testing.assert_close(huge, expected, rtol=1e-5, atol=1e-6)
        rewards = torch.zeros(3, 3)
        rewards[[0, 1, 2], [1, 2, 0]] = torch.tensor([2.0, 0.5, 4.0])
        unit, _ = A.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, mask, all_reduce=all_reduce)
        huge, _ = A.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards * 1e25, mask, all_reduce=all_reduce)
        torch.testing.assert_close(huge, unit, rtol=1e-5, atol=1e-6)


def test_dr_grpo_and_rloo_by_hand():
    rewards = group_rewards()
    adv, _ = A.ADVANTAGE_ESTIMATORS["dr_grpo"](rewards, GROUP_MASK, group_ids=GROUP_IDS)
    close(adv[:, 0], [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0])
    adv, _ = A.ADVANTAGE_ESTIMATORS["rloo"](rewards, GROUP_MASK, group_ids=GROUP_IDS)
    close(adv[:, 0], [-1.5, -2.0, 0.0, 0.0, 2.0, 1.5])
    close(adv[:, 1], [-1.5, 0.0, 0.0, 0.0, 2.0, 0.0])  # rows 1, 3, 5 have one real token
    for name in ("grpo", "dr_grpo", "rloo"):
        with pytest.raises(ValueError, match="group_ids"):
            A.ADVANTAGE_ESTIMATORS[name](rewards, GROUP_MASK)


def test_reinforce_pp_is_whitened_reward_to_go():
    rewards, _, mask = random_batch(seed=6)
    adv, ret = A.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, mask, gamma=0.9)
    expected_ret = torch.tensor(py_returns(rewards.tolist(), mask.tolist(), 0.9))
    close(ret, expected_ret, 1e-5)
    real = expected_ret[mask.bool()]
    expected_adv = torch.zeros_like(expected_ret)
    expected_adv[mask.bool()] = (real - real.mean()) / torch.sqrt(real.var() + 1e-8)
    close(adv, expected_adv, 1e-5)


# ---------------------------------------------------------------------------- policy and value losses


def test_pg_loss_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = A.POLICY_LOSSES["pg"](lp, lp.detach(), adv, mask)
    close(loss, (2.0 + 6.0) / 2)
    loss.backward()
    close(lp.grad, [[-1.0, -1.5, 0.0]])
    assert stats == {"clip_frac": 0.0, "approx_kl": 0.0}


def ppo_case():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    return lp, old, adv, torch.ones(1, 4)


def test_ppo_clip_by_hand():
    lp, old, adv, mask = ppo_case()
    loss, stats = A.POLICY_LOSSES["ppo_clip"](lp, old, adv, mask, clip_range=0.2)
    close(loss, (-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert stats["approx_kl"] == pytest.approx(expected_kl, rel=1e-5)


def test_ppo_clip_gradient_is_zero_for_clipped_tokens():
    lp, old, adv, mask = ppo_case()
    loss, _ = A.POLICY_LOSSES["ppo_clip"](lp, old, adv, mask, clip_range=0.2)
    loss.backward()
    # d/dlp of -A*ratio/4 = -A*ratio/4 for unclipped tokens 1 and 3
    close(lp.grad, [[0.0, -0.5 / 4, 0.0, 1.5 / 4]])


def test_ppo_clip_higher_and_dual_clip():
    lp, old, adv, mask = ppo_case()
    loss, stats = A.POLICY_LOSSES["ppo_clip"](lp, old, adv, mask, clip_range=0.2, clip_range_high=0.6)
    close(loss, (-1.5 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clip_frac"] == pytest.approx(0.25)
    lp = torch.log(torch.tensor([[5.0, 5.0]]))
    old = torch.zeros(1, 2)
    adv = torch.tensor([[-1.0, 1.0]])
    loss, stats = A.POLICY_LOSSES["ppo_clip"](lp, old, adv, torch.ones(1, 2), dual_clip=3.0)
    # token 0: max(5, 1.2) = 5 capped at 3; token 1 (A > 0): max(-5, -1.2) = -1.2
    close(loss, (3.0 - 1.2) / 2)
    assert stats["dual_clip_frac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dual_clip"):
        A.POLICY_LOSSES["ppo_clip"](lp, old, adv, torch.ones(1, 2), dual_clip=0.5)


def test_ppo_clip_equals_pg_gradient_at_ratio_one():
    g = torch.Generator().manual_seed(7)
    lp = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    grads = []
    for name in ("pg", "ppo_clip"):
        x = lp.clone().requires_grad_(True)
        A.POLICY_LOSSES[name](x, lp, adv, MASK.repeat(1, 2)[:, :5])[0].backward()
        grads.append(x.grad)
    close(grads[0], grads[1], 1e-6)


def test_value_loss_by_hand():
    v = torch.tensor([[1.0, 2.0]])
    old = torch.tensor([[0.5, 1.9]])
    ret = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, stats = A.value_loss(v, old, ret, mask, clip_range=0.2)
    close(loss, (0.5 * 1.69 + 0.5 * 1.0) / 2)
    assert stats["vf_clip_frac"] == pytest.approx(0.5)
    loss, stats = A.value_loss(v, old, ret, mask, clip_range=None)
    close(loss, 0.5)


# ---------------------------------------------------------------------------- logits helpers


def test_entropy_from_logits():
    close(A.entropy_from_logits(torch.zeros(2, 3, 4)), torch.full((2, 3), math.log(4)))
    close(A.entropy_from_logits(torch.tensor([[[1000.0, 1000.0, -1000.0]]])), [[math.log(2)]], 1e-5)
    logits = torch.randn(2, 3, 11)
    p = torch.softmax(logits.double(), -1)
    close(A.entropy_from_logits(logits), -(p * p.log()).sum(-1).float(), 1e-5)


def test_logprobs_from_logits_float_and_bf16():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 4, 50, generator=g) * 5
    labels = torch.randint(0, 50, (3, 4), generator=g)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    close(A.logprobs_from_logits(logits, labels), expected, 1e-5)
    close(A.logprobs_from_logits(logits.bfloat16(), labels), expected, 0.15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_from_one_log_softmax(dtype):
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 4, 50, generator=g) * 5).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 4), generator=g)
    logprobs, entropy = A.logprobs_and_entropy_from_logits(logits, labels)
    close(logprobs, A.logprobs_from_logits(logits, labels), 1e-6)
    close(entropy, A.entropy_from_logits(logits.detach()), 1e-5)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.requires_grad and not entropy.requires_grad
    logprobs.sum().backward()
    probs = torch.softmax(logits.detach().double(), -1)
    expected_grad = torch.nn.functional.one_hot(labels, 50).double() - probs  # d lp / d z = onehot - p
    assert torch.allclose(logits.grad.double(), expected_grad, atol=1e-5 if dtype == torch.float32 else 0.02)


# ---------------------------------------------------------------------------- TRPO math


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(9)
    M = torch.randn(20, 20, generator=g)
    spd = M @ M.T + 20 * torch.eye(20)
    b = torch.randn(20, generator=g)
    x = A.conjugate_gradient(lambda v: spd @ v, b, iters=50)
    assert torch.allclose(spd @ x, b, atol=1e-5)
    assert torch.allclose(x, torch.linalg.solve(spd, b), atol=1e-5)


def test_trpo_step_size_meets_kl_bound():
    step = torch.tensor([1.0, 0.0])
    curvature = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    beta = A.trpo_step_size(step, curvature @ step, max_kl=0.01)
    assert beta == pytest.approx(0.1)
    scaled = beta * step
    assert 0.5 * float(scaled @ curvature @ scaled) == pytest.approx(0.01)
    assert A.trpo_step_size(step, -step, 0.01) == 0.0


def test_backtracking_line_search():
    def f(x):
        return float(((x - 1.0) ** 2).sum())

    x0 = torch.zeros(1)
    full_step = torch.tensor([4.0])
    expected_improve = 8.0  # -grad f(x0) . full_step = 2 * 4
    accepted, x = A.backtracking_line_search(f, x0, full_step, expected_improve)
    assert accepted and torch.allclose(x, torch.tensor([1.0]))  # 4 and 2 do not improve; 1 does
    accepted, x = A.backtracking_line_search(f, x0, full_step, expected_improve, constraint=lambda x: float(x) < 0.9)
    assert accepted and torch.allclose(x, torch.tensor([0.5]))
    accepted, x = A.backtracking_line_search(lambda x: float(x.sum()), x0, torch.ones(1), 1.0)
    assert not accepted and torch.equal(x, x0)


# ---------------------------------------------------------------------------- precision and purity


def test_bfloat16_inputs_give_float32_results():
    rewards, values, mask = random_batch(seed=10)
    ids = torch.tensor([0, 0, 1, 1, 1])
    for name in A.ADVANTAGE_ESTIMATORS:
        adv32, ret32 = A.ADVANTAGE_ESTIMATORS[name](rewards, mask, values=values, group_ids=ids)
        adv16, ret16 = A.ADVANTAGE_ESTIMATORS[name](
            rewards.bfloat16(), mask, values=values.bfloat16(), group_ids=ids
        )
        assert adv16.dtype == ret16.dtype == torch.float32, name
        assert torch.allclose(adv16, adv32, atol=0.05), name
    # Fixed data, and the same generator state for both calls: clip_cov draws tokens at random,
    # and bfloat16 rounding may move a token across its covariance band on unlucky data.
    torch.manual_seed(0)
    lp = -torch.rand(5, 7) * 3
    old = lp + 0.05 * torch.randn(5, 7)
    adv = torch.randn(5, 7)
    for name in A.POLICY_LOSSES:
        torch.manual_seed(1)
        loss32, _ = A.POLICY_LOSSES[name](lp, old, adv, mask)
        torch.manual_seed(1)
        loss16, _ = A.POLICY_LOSSES[name](lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
        assert loss16.dtype == torch.float32
        assert torch.allclose(loss16, loss32, atol=0.05), name
    assert A.masked_mean(values.bfloat16(), mask).dtype == torch.float32
    assert A.masked_whiten(values.bfloat16(), mask).dtype == torch.float32
    assert A.kl_penalty(lp.bfloat16(), old.bfloat16(), "k3").dtype == torch.float32
    loss, _ = A.value_loss(values.bfloat16(), values.bfloat16(), rewards.bfloat16(), mask)
    assert loss.dtype == torch.float32


def test_inputs_are_not_modified():
    rewards, values, mask = random_batch(seed=11)
    ids = torch.tensor([0, 0, 1, 1, 1])
    snapshot = [t.clone() for t in (rewards, values, mask, ids)]
    for fn in A.ADVANTAGE_ESTIMATORS.values():
        fn(rewards, mask, values=values, group_ids=ids, baseline=0.3)
    for fn in A.POLICY_LOSSES.values():
        fn(values, rewards, rewards, mask, dual_clip=3.0)
    A.masked_whiten(values, mask)
    A.token_level_rewards(rewards[:, 0], mask, kl=values, kl_coef=0.1)
    A.value_loss(values, rewards, rewards, mask)
    for before, after in zip(snapshot, (rewards, values, mask, ids)):
        assert torch.equal(before, after)
