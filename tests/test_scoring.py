"""rlhf.scoring and rlhf.experience: process rewards, DAPO's overlong penalty, dynamic sampling
and truncated-completion masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import FIXTURES
from reward_models import CombinedReward
from rlhf.errors import RewardError
from rlhf.rollout import Rollout
from rlhf.scoring import ROUND_GROUP_STRIDE, overlong_penalty, process_rewards_to_tokens, sample_with_spread

TOKENIZER = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")


def text_rollout(texts: list[str], group_ids: list[int] | None = None, eos: list[bool] | None = None) -> Rollout:
    """A rollout whose responses are these texts (tokenised), right-padded."""
    rows = [TOKENIZER(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = TOKENIZER.pad_token_id
    response = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    prompt = torch.full((len(rows), 2), 5)
    return Rollout(input_ids=torch.cat([prompt, response], 1), attention_mask=torch.cat([torch.ones_like(prompt), mask.long()], 1),
                   response_ids=response, mask=mask, eos_found=torch.tensor(eos or [True] * len(rows)),
                   group_ids=torch.tensor(group_ids or list(range(len(rows)))), prompts=["p"] * len(rows),
                   completions=texts)


def pay_for_word(word: str, value: float = 1.0):
    def reward(prompts, completions, **kwargs):
        return [[(text.find(word), value)] if word in text else [] for text in completions]
    return reward


def test_a_process_reward_lands_on_the_token_that_writes_its_character():
    texts = ["The cat sat on the mat.", "No felines here", "sat"]
    rollout = text_rollout(texts)
    output = CombinedReward([f"{FIXTURES / 'rewards.py'}:constant"])(rollout.prompts, rollout.completions)
    assert output.steps is None  # outcome-only rewards: nothing per token
    steps = [pay_for_word("sat")(None, texts)[i] for i in range(3)]
    tokens = process_rewards_to_tokens(steps, rollout, TOKENIZER)
    for row, text in enumerate(texts):
        hits = tokens[row].nonzero().flatten().tolist()
        if "sat" not in text:
            assert hits == []
            continue
        (index,) = hits
        ids = rollout.response_ids[row].tolist()
        before = TOKENIZER.decode(ids[:index])
        through = TOKENIZER.decode(ids[:index + 1])
        assert len(before) <= text.find("sat") < len(through)  # this token writes the 's'
        assert tokens[row, index] == 1.0


def test_positions_past_the_end_land_on_the_last_token_and_rewards_add_up():
    rollout = text_rollout(["hello world", "hi"])
    steps = [[(0, 0.5), (0, 0.25), (999, 2.0)], [(1, -1.0)]]
    tokens = process_rewards_to_tokens(steps, rollout, TOKENIZER)
    length = int(rollout.mask[0].sum())
    assert float(tokens[0, 0]) == 0.75 and float(tokens[0, length - 1]) == 2.0
    assert float(tokens[1].sum()) == -1.0 and float(tokens[1, int(rollout.mask[1].sum()):].abs().sum()) == 0.0


def test_combined_reward_keeps_process_rewards_apart_from_outcomes(tmp_path):
    rewards = tmp_path / "r.py"
    rewards.write_text("def outcome(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n"
                       "def steps(prompts, completions, **kw):\n    return [[(0, 0.5), (2, 0.25)], []]\n"
                       "def broken(prompts, completions, **kw):\n    return [[('a', 1.0)], []]\n")
    combined = CombinedReward([f"{rewards}:outcome", f"{rewards}:steps"], weights=[1.0, 2.0])
    output = combined(["p", "p"], ["abc", "d"])
    assert output.total == [1.0, 1.0]  # outcome rewards only
    assert output.components["steps"] == [0.75, 0.0]  # logged: the sum of a sample's process rewards
    assert output.steps == [[(0, 1.0), (2, 0.5)], []]  # weighted
    assert output.combined() == [2.5, 1.0]  # what evaluation reports: outcome + process rewards
    assert output.per_sample(["abc", "d"]) == [[(0, 1.0), (2, 0.5), (3, 1.0)], 1.0]  # what serve_reward.py returns
    with pytest.raises(RewardError, match=r"char_position, reward"):
        CombinedReward([f"{rewards}:broken"])(["p", "p"], ["abc", "d"])
    tolerant = CombinedReward([f"{rewards}:broken", f"{rewards}:steps"], on_error="zero")(["p", "p"], ["abc", "d"])
    assert tolerant.failed == [True, False] and tolerant.steps == [[(0, 0.5), (2, 0.25)], []]


def test_overlong_penalty_is_linear_in_the_last_buffer_tokens():
    lengths = torch.tensor([10, 24, 26, 28, 32])
    penalty = overlong_penalty(lengths, max_new_tokens=32, buffer_length=8, factor=0.5)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, 0.125, 0.25, 0.5])


def scored_rounds(rounds: list[list[float]], group_size: int = 2):
    """sample/score callables replaying given score lists, one rollout of len(scores) rows per round."""
    calls = {"n": 0}

    def sample() -> Rollout:
        scores = rounds[calls["n"]]
        rollout = text_rollout([f"round {calls['n']} row {i}" for i in range(len(scores))],
                               group_ids=[i // group_size for i in range(len(scores))])
        calls["n"] += 1
        return rollout

    def score(rollout):
        return torch.tensor(rounds[calls["n"] - 1]), None, {"reward_mean": float(sum(rounds[calls["n"] - 1]))}

    return sample, score, calls


class OneProcess:
    def sum(self, value):
        return torch.as_tensor(value, dtype=torch.float32)

    def max(self, value):
        return value


def test_dynamic_sampling_resamples_until_enough_groups_have_spread():
    # round 0: groups (1, 1) and (0, 1) -> one spread group; round 1: (2, 3), (4, 4) -> one more
    sample, score, calls = scored_rounds([[1.0, 1.0, 0.0, 1.0], [2.0, 3.0, 4.0, 4.0]])
    rollout, scores, token_scores, metrics = sample_with_spread(sample, score, 2, 4, OneProcess(), TOKENIZER.pad_token_id)
    assert calls["n"] == 2 and metrics["dynamic_sampling/rounds"] == 2.0
    assert metrics["dynamic_sampling/missing_groups"] == 0.0 and metrics["reward_mean"] == 3.0  # first round's
    assert scores.tolist() == [0.0, 1.0, 2.0, 3.0] and token_scores is None
    assert rollout.completions == ["round 0 row 2", "round 0 row 3", "round 1 row 0", "round 1 row 1"]
    assert rollout.group_ids.tolist() == [1, 1, ROUND_GROUP_STRIDE, ROUND_GROUP_STRIDE]  # never merged across rounds


def test_dynamic_sampling_counts_reward_failures_of_every_round():
    sample, score, _ = scored_rounds([[1.0, 1.0, 0.0, 0.0], [2.0, 3.0, 4.0, 5.0]])

    def failing_score(rollout):
        scores, token_scores, metrics = score(rollout)
        return scores, token_scores, {**metrics, "reward_errors": 1.0}  # one failed sample per round

    _, _, _, metrics = sample_with_spread(sample, failing_score, 2, 4, OneProcess(), TOKENIZER.pad_token_id)
    assert metrics["dynamic_sampling/rounds"] == 2.0 and metrics["reward_errors"] == 2.0  # skip_batch sees both


def test_dynamic_sampling_stops_at_max_rounds_and_tops_up_with_flat_groups():
    sample, score, calls = scored_rounds([[1.0, 1.0, 0.0, 1.0], [5.0, 5.0, 4.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    rollout, scores, _, metrics = sample_with_spread(sample, score, 2, 2, OneProcess(), TOKENIZER.pad_token_id)
    assert calls["n"] == 2 and metrics["dynamic_sampling/missing_groups"] == 1.0
    assert len(rollout) == 4 and scores.tolist() == [0.0, 1.0, 1.0, 1.0]  # spread group, then the first flat one


def test_mask_truncated_completions_and_process_rewards_reach_the_returns(tiny_model_dir, tmp_path):
    from test_correctness import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, "reinforce", num_generations=1, rollout_batch_size=4,
                           mini_batch_size=4, kl_coef=0.0, mask_truncated_completions=True, gamma=1.0)
    texts = ["The cat sat on the mat.", "sat down", "nothing", "a cat sat"]
    rollout = text_rollout(texts, eos=[True, False, True, True])
    steps = [pay_for_word("sat", 1.0)(None, [t])[0] for t in texts]
    token_scores = process_rewards_to_tokens(steps, rollout, TOKENIZER)
    batch, _ = trainer.make_experience(rollout, torch.zeros(4), token_scores)
    assert batch.loss_mask[1].sum() == 0 and batch.loss_mask[0].sum() == rollout.mask[0].sum()
    for row in (0, 3):  # REINFORCE reward-to-go: 1 up to the token that writes "sat", 0 after it
        index = int(token_scores[row].nonzero())
        length = int(rollout.mask[row].sum())
        assert batch.returns[row, :index + 1].tolist() == [1.0] * (index + 1)
        assert batch.returns[row, index + 1:length].abs().sum() == 0.0
    assert batch.returns[2].abs().sum() == 0.0


def test_a_process_reward_function_trains_end_to_end(tiny_model_dir, tmp_path):
    from test_correctness import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path / "run", "ppo", num_generations=1, rollout_batch_size=4,
                           mini_batch_size=4, reward_funcs=[f"{FIXTURES / 'rewards.py'}:reward_each_e",
                                                            f"{FIXTURES / 'rewards.py'}:char_diversity"], max_steps=2)
    trainer.train()
    rows = [json.loads(line) for line in Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward_mean"] == pytest.approx(r["rewards/reward_each_e/mean"] + r["rewards/char_diversity/mean"], abs=1e-5)
               for r in rows)


def test_score_makes_the_same_collectives_with_and_without_process_rewards():
    """Processes whose samples got no process reward must still join every gather, or a run whose
    process rewards appear on one process only would hang."""
    from types import SimpleNamespace

    from rlhf.config import RLConfig
    from rlhf.scoring import score

    class CountingReducer(OneProcess):
        def __init__(self):
            self.calls = []

        def gather(self, tensor):
            self.calls.append("gather")
            return tensor

        def sum(self, value):
            self.calls.append("sum")
            return super().sum(value)

        def mean(self, value):
            self.calls.append("mean")
            return float(torch.as_tensor(value).float().mean())

    rollout = text_rollout(["The cat sat", "no cat here"])
    config = RLConfig(reward_clip=1.0, normalize_rewards=True)
    calls = {}
    for name, values in (("outcome", [0.5, 0.25]), ("process", [[(4, 1.0)], []])):
        output = SimpleNamespace(total=[0.0, 0.0] if name == "process" else values, failed=[False, False],
                                 components={"r": [0.0, 0.0]}, steps=values if name == "process" else None,
                                 unscorable=[False, False])
        reducer = CountingReducer()
        score(lambda *a, **k: output, rollout, config, reducer, 1, TOKENIZER)
        calls[name] = reducer.calls
    assert calls["outcome"] == calls["process"]


def test_dynamic_sampling_lets_the_earlier_rounds_products_go_before_the_next_round():
    """Rows of several rounds (or parts) are joined without the sampler's kept products, so a round
    that leaves this process short of groups cannot hand its products to the update: they are
    released before the next round samples, instead of holding memory (logits included) through it
    (helper-58). A process that has its groups keeps them: its batch may be one round's rows."""
    sample, score, calls = scored_rounds([[1.0, 1.0, 0.0, 1.0], [2.0, 3.0, 4.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    released = []

    class Products:
        def __init__(self, round_):
            self.round = round_

        def release(self):
            released.append((self.round, calls["n"]))  # (whose products, rounds sampled so far)

    def sample_with_products():
        rollout = sample()
        rollout.sampled_products = Products(calls["n"] - 1)
        return rollout

    sample_with_spread(sample_with_products, score, 2, 4, OneProcess(), TOKENIZER.pad_token_id)
    assert calls["n"] == 2 and released == [(0, 1)]  # round 0's, before round 1 sampled; round 1's are the batch's

    class OtherProcessShort(OneProcess):
        def max(self, value):  # another process still needs groups: every process samples again
            return max(float(value), 1.0)

    released.clear()
    sample, score, calls = scored_rounds([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    rollout, _, _, _ = sample_with_spread(sample_with_products, score, 2, 2, OtherProcessShort(), TOKENIZER.pad_token_id)
    assert calls["n"] == 2 and released == []  # this process had its two groups from round 0
    assert isinstance(rollout.sampled_products, Products) and rollout.sampled_products.round == 0
