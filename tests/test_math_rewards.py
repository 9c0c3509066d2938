"""exact_answer through math-verify (issue 18), and TRL's conversational completions in every
built-in reward and in learned reward models."""

from __future__ import annotations

import threading

import pytest

from reward_models import load_reward_function
from reward_models.builtins import BUILTIN_REWARDS, completion_text, make_exact_answer


def score(completions, answers, **kwargs):
    return make_exact_answer(**kwargs)(prompts=[""] * len(completions), completions=completions, answer=answers)


# ---------------------------------------------------------------------------- exact_answer


def test_the_issue_cases():
    # The old regex read "1}{2" out of the nested braces as 2, and missed "42 apples".
    assert score([r"\boxed{\frac{1}{2}}", "The answer is 42 apples."], ["2", 42]) == [0.0, 1.0]


@pytest.mark.parametrize("gold, completion", [
    ("1/2", r"The answer is \boxed{\frac{1}{2}}"),
    (r"\frac{1}{2}", "The answer is 0.5"),
    ("0.5", r"\boxed{\frac{1}{2}}"),
    ("50%", "The answer is 50%"),
    ("50%", r"\boxed{50\%}"),
    ("50%", "The answer is 0.5"),
    ("$3.50", "The answer is $3.50"),
    ("$3.50", "answer: 3.5"),
    ("1000", r"so the total is \boxed{1,000}"),
    ("1,000", "The answer is 1000."),
    ("1000", "Final answer: 1,000"),
    ("x^2+1", r"so $f(x)=\boxed{1+x^2}$"),
    (r"\sqrt{2}", r"\boxed{\sqrt{2}}"),
    ("$x^2+1$", "the answer is $x^2 + 1$"),
    ("-3", "The answer is -3"),
    ("#### 72", r"\boxed{72}"),
    (12, "The answer is 12."),
])
def test_equal_forms_score_one(gold, completion):
    assert score([completion], [gold]) == [1.0]


@pytest.mark.parametrize("gold, completion", [
    ("42", "answer: 41"),
    ("3", "The answer is -3"),
    ("1/2", r"\boxed{2}"),
    ("x^2+1", r"\boxed{x^2-1}"),
    ("3", "no idea"),
    ("9", "I think 7 then 9"),  # a number with no anchor is no answer (else a list of numbers guesses)
])
def test_wrong_or_missing_answers_score_zero(gold, completion):
    assert score([completion], [gold]) == [0.0]


@pytest.mark.parametrize("completion", [
    r"\boxed{1} \boxed{2} \boxed{5}",          # several boxes parse as the set {1, 2, 5}
    r"\boxed{5} or maybe \boxed{6}",
    r"\boxed{5 or 6}",
    r"\boxed{1, 2, 3, 4, 5, 6}",
    "The answer is 1, 2, 3, 4, 5, 6",          # only the first number after the anchor counts
    " ".join(str(i) for i in range(100)) + " 5",
])
def test_many_answers_do_not_win(completion):
    assert score([completion], ["5"]) == [0.0]


def test_first_boxed_answer_is_the_answer():
    assert score([r"The answer is \boxed{5}. Also the answer is 6"], ["5"]) == [1.0]


def test_unparseable_gold_is_not_applicable():
    assert score(["The answer is Paris", "x", r"\boxed{3}"], ["Paris", "", "3"]) == [None, None, 1.0]


def test_pattern_group_is_verified():
    kwargs = {"pattern": r"####\s*([^\n]+)"}  # the last match counts
    completions = ["work... #### 1,000", "#### 5 or 6", "no marker 5", "#### 1\n#### \\frac{1}{2}"]
    assert score(completions, ["1000", "5", "5", "0.5"], **kwargs) == [1.0, 0.0, 0.0, 1.0]
    assert score(["Result=7", "Result=7"], ["7", "8"], pattern=r"(?<=Result=)\d+") == [1.0, 0.0]  # no group: the match
    with pytest.raises(ValueError, match="bad pattern"):
        make_exact_answer(pattern="(")


def test_scores_off_the_main_thread():
    # math-verify times out with signal.alarm, which raises ValueError outside the main thread.
    results = []
    worker = threading.Thread(target=lambda: results.append(score([r"\boxed{\frac{1}{2}}", "answer: 3"], ["0.5", "4"])))
    worker.start()
    worker.join()
    assert results == [[1.0, 0.0]]


def test_loaded_by_name_and_missing_column():
    fn = load_reward_function("exact_answer", {"column": "solution"})
    assert fn(prompts=[""], completions=[r"\boxed{7}"], solution=["7"]) == [1.0]
    with pytest.raises(KeyError, match="solution"):
        fn(prompts=[""], completions=["1"])


# ---------------------------------------------------------------------------- conversational completions


def test_completion_text():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text([{"content": "no role"}]) == "no role"
    turns = [{"role": "assistant", "content": "call tool"}, {"role": "tool", "content": "42"},
             {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "image"},
                                               {"type": "text", "text": "42."}]}]
    assert completion_text(turns) == "call tool\nIt is 42."
    with pytest.raises(TypeError, match="list of messages"):
        completion_text(None)


@pytest.mark.parametrize("name, kwargs", [
    ("sentiment", {}), ("length", {"target": 3, "tolerance": 0}), ("format", {}),
    ("keywords", {"include": ["great"], "avoid": ["bad"]}), ("no_repeat", {"n": 1}), ("exact_answer", {}),
])
def test_every_builtin_takes_message_lists(name, kwargs):
    texts = ["What a great day.", "bad bad bad", r"The answer is \boxed{4}"]
    messages = [[{"role": "assistant", "content": t}] for t in texts]
    prompts = [[{"role": "user", "content": "Say something"}]] * len(texts)
    fn = BUILTIN_REWARDS[name](**kwargs)
    columns = {"answer": ["1", "2", "4"]}
    assert fn(prompts, messages, **columns) == fn(["Say something"] * len(texts), texts, **columns)
    assert len(set(fn(prompts, messages, **columns))) > 1  # the texts were read, not an empty string


def test_learned_reward_takes_message_lists(tiny_reward_backbone):
    from reward_models.learned import LearnedReward

    reward = LearnedReward(str(tiny_reward_backbone))
    prompts, completions = ["Say hi", "Describe rain"], ["Hello!", "It is wet."]
    as_messages = ([[{"role": "user", "content": p}] for p in prompts],
                   [[{"role": "assistant", "content": c}] for c in completions])
    assert reward.format("Say hi", "Hello!") == "Say hi\nHello!"  # no chat template: concatenation as before
    assert reward(*as_messages) == pytest.approx(reward(prompts, completions))

    # With a chat template: prompt messages + completion messages, as TRL's GRPOTrainer formats them.
    reward.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    assert reward.format(system, [{"role": "assistant", "content": "Hello!"}]) == \
        "<system>Be brief.\n<user>Say hi\n<assistant>Hello!\n"
    assert reward.format("Say hi", "Hello!") == "<user>Say hi\n<assistant>Hello!\n"
