"""The reward system: built-ins, user functions (sync/async), learned and remote rewards."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import FIXTURES, ROOT, free_port, run_script, tiny_args
from reward_models import CombinedReward, load_reward_function
from reward_models.remote import RemoteReward
from reward_models.server import make_server
from rlhf.errors import RewardError


def call(spec, completions, kwargs=None, **columns):
    return load_reward_function(spec, kwargs)(prompts=[""] * len(completions), completions=completions, **columns)


# ---------------------------------------------------------------------------- built-ins


def test_length_reward():
    texts = ["one two three", "w " * 10, "w " * 20, "w " * 30]
    assert call("length", texts, {"target": 10, "tolerance": 2}) == [0.5, 1.0, pytest.approx(0.2), 0.0]
    assert call("length", ["abcd"], {"target": 4, "tolerance": 0, "unit": "chars"}) == [1.0]


def test_format_reward():
    assert call("format", ["Hello there.", "hello there", "Yes!"]) == [1.0, 0.0, 1.0]
    assert call("format", ["Answer: 42", "no"], {"pattern": r"Answer: \d+", "mode": "fullmatch"}) == [1.0, 0.0]


def test_keywords_reward():
    kwargs = {"include": ["thanks", "great"], "avoid": ["bad"]}
    assert call("keywords", ["Thanks, great job", "great but bad", "nothing"], kwargs) == [1.0, 0.5 - 1.0, 0.0]


def test_no_repeat_reward():
    assert call("no_repeat", ["a b c d e", "a b a b a b", "short"], {"n": 2}) == [0.0, pytest.approx(-3 / 5), 0.0]


def test_exact_answer_reward():
    completions = ["so the total is \\boxed{1,000}", "The answer is 12.", "I think 7 then 9", "no idea"]
    # an unanchored last number is no answer (math-verify, as TRL's accuracy_reward): tests/test_math_rewards.py
    assert call("exact_answer", completions, answer=["1000", "12", "9", "3"]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="answer"):
        call("exact_answer", ["1"])


def test_builtin_kwargs_errors_are_reward_errors():
    with pytest.raises(RewardError, match="length"):
        load_reward_function("length", {"target": 0})
    with pytest.raises(RewardError, match="unexpected keyword"):
        load_reward_function("format", {"patern": "x"})
    with pytest.raises(RewardError, match="match no reward_funcs entry"):
        CombinedReward(["sentiment"], kwargs={"length": {"target": 3}})


# ---------------------------------------------------------------------------- user functions


def test_async_rewards_run_concurrently(tmp_path):
    module = tmp_path / "async_rewards.py"
    # first() waits for an event that only second() sets: sequential awaiting would time out.
    module.write_text(
        "import asyncio\n"
        "EVENT = None\n"
        "def _event():\n"
        "    global EVENT\n"
        "    EVENT = EVENT or asyncio.Event()\n"
        "    return EVENT\n"
        "async def first(prompts, completions, **kw):\n"
        "    await asyncio.wait_for(_event().wait(), timeout=5)\n"
        "    return [1.0] * len(completions)\n"
        "async def second(prompts, completions, **kw):\n"
        "    _event().set()\n"
        "    return [2.0] * len(completions)\n"
    )
    combined = CombinedReward([f"{module}:first", f"{module}:second"])
    assert combined(["p"], ["c"]).total == [3.0]


def test_user_function_errors_name_the_line_and_sample(tmp_path):
    broken_import = tmp_path / "broken_import.py"
    broken_import.write_text("import math\nvalue = 1 / 0\n")
    with pytest.raises(RewardError, match=r"ZeroDivisionError.*broken_import.py:2"):
        load_reward_function(f"{broken_import}:f")
    picky = tmp_path / "picky.py"
    picky.write_text("def f(prompts, completions, **kw):\n    return [1.0 / (c != 'bad') for c in completions]\n")
    with pytest.raises(RewardError, match=r"ZeroDivisionError.*on sample 1"):
        CombinedReward([f"{picky}:f"])(["a", "b", "c"], ["good", "bad", "ok"])
    with pytest.raises(RewardError, match="returned inf"):
        CombinedReward._check("f", [float("inf")], ["c"])


def test_user_function_receives_reward_kwargs(tmp_path):
    module = tmp_path / "scaled.py"
    module.write_text("def f(prompts, completions, scale=1.0, **kw):\n    return [scale] * len(completions)\n")
    assert CombinedReward([f"{module}:f"], kwargs={"f": {"scale": 3.0}})(["p"], ["c"]).total == [3.0]


# ---------------------------------------------------------------------------- remote


@pytest.fixture()
def reward_server():
    server = make_server(CombinedReward(["sentiment", "length"], [1.0, 0.5]), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def test_remote_reward_matches_local(reward_server):
    completions = ["I love this wonderful day", "This is terrible"]
    local = CombinedReward(["sentiment", "length"], [1.0, 0.5])(["a", "b"], completions).total
    remote = RemoteReward(reward_server)(prompts=["a", "b"], completions=completions)
    assert remote == pytest.approx(local)


def test_remote_unreachable_and_malformed():
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(RewardError, match=rf"remote reward {url} failed after 2 tries"):
        RemoteReward(url, timeout=2, max_retries=1, backoff=0.01)(prompts=["p"], completions=["c"])

    class Garbage(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not json")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RewardError, match="malformed JSON"):
            RemoteReward(f"http://127.0.0.1:{server.server_port}/", max_retries=0)(prompts=["p"], completions=["c"])
    finally:
        server.shutdown()
        server.server_close()


def test_serve_reward_script(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_reward.py"), "--reward_funcs", "sentiment",
                                "--port", str(port)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert "serving sentiment" in process.stdout.readline()
        rewards = RemoteReward(f"http://127.0.0.1:{port}")(prompts=["p"], completions=["What a great, happy day!"])
        assert rewards[0] > 0.5
    finally:
        process.terminate()
        process.wait(timeout=10)


# ---------------------------------------------------------------------------- training through every kind


def test_ppo_with_remote_reward_and_bad_endpoint(tiny_model_dir, tmp_path, reward_server, run_here):
    out = tmp_path / "run"
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1", "--reward_funcs", reward_server))
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert f"rewards/{reward_server.split('//')[1].rstrip('/')}/mean" in row
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, tmp_path / "run2", "--max_steps", "1",
                                                 "--reward_funcs", f"http://127.0.0.1:{free_port()}/"))
    assert result.returncode == 2 and "failed after" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- learned reward models


def test_learned_reward_scores_in_batches(tiny_reward_backbone):
    from reward_models.learned import LearnedReward

    prompts = ["Say hi", "Describe rain", "Tell a joke"]
    completions = ["Hello!", "It is wet and grey outside.", "Why did the chicken cross the road?"]
    whole = LearnedReward(str(tiny_reward_backbone), batch_size=8)(prompts, completions)
    split = LearnedReward(str(tiny_reward_backbone), batch_size=1)(prompts, completions)
    assert whole == pytest.approx(split, abs=1e-5) and len(set(whole)) == 3
    spec_fn = load_reward_function(str(tiny_reward_backbone))
    assert spec_fn(prompts=prompts, completions=completions) == pytest.approx(whole, abs=1e-5)
    with pytest.raises(RewardError, match="no calibration"):
        LearnedReward(str(tiny_reward_backbone), normalize=True)


def test_train_reward_model_then_use_it_in_ppo(tiny_reward_backbone, tiny_model_dir, tmp_path, run_here):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "Happy to help, great question!",
                                         "rejected": "Go away."}) + "\n" for i in range(16)))
    rm_dir = tmp_path / "rm"
    result = run_script("train_reward_model.py", "--model_name_or_path", str(tiny_reward_backbone), "--dataset",
                        str(pairs), "--eval_dataset", str(pairs), "--output_dir", str(rm_dir), "--num_train_epochs", "3",
                        "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--logging_steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((rm_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["eval_pairwise_accuracy"] == 1.0  # 16 identical pairs: trivially separable
    metadata = json.loads((rm_dir / "rlhf_reward_model.json").read_text())
    assert metadata["score_std"] > 0

    out = tmp_path / "ppo"
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "1", "--reward_funcs", str(rm_dir),
                                                 "--reward_kwargs", json.dumps({"rm": {"normalize": True}})))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rewards/rm/mean" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    again = run_here("train_reward_model.py", "--model_name_or_path", str(tiny_reward_backbone), "--dataset", str(pairs),
                     "--output_dir", str(rm_dir))
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwrite a trained model


def test_readme_custom_reward_example_works(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Custom rewards"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    (tmp_path / "my_rewards.py").write_text(code)
    combined = CombinedReward(["sentiment", f"{tmp_path / 'my_rewards.py'}:polite_and_brief"], [1.0, 0.5],
                              kwargs={"polite_and_brief": {"max_words": 20}})
    output = combined(["p", "p"], ["Thank you so much!", "word " * 40])
    assert output.components["polite_and_brief"] == [1.0, pytest.approx(-1.0)]


# A chat template on the BERT tokenizer (which adds [CLS]/[SEP] to plain text): a template that
# writes its own markers, like Llama-3's BOS.
SIMPLE_TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }}: {{ m['content'] }} [SEP]{% endfor %}"
                   "{% if add_generation_prompt %}[CLS] assistant:{% endif %}")
PAIR_FORMS = {
    "standard": {"prompt": "Is rain wet?", "chosen": "Yes, quite wet.", "rejected": "No."},
    "conversational": {"prompt": [{"role": "user", "content": "Is rain wet?"}],
                       "chosen": [{"role": "assistant", "content": "Yes, quite wet."}],
                       "rejected": [{"role": "assistant", "content": "No."}]},
    "implicit conversational": {
        "chosen": [{"role": "user", "content": "Is rain wet?"}, {"role": "assistant", "content": "Yes, quite wet."}],
        "rejected": [{"role": "user", "content": "Is rain wet?"}, {"role": "assistant", "content": "No."}]},
    "text prompt beside conversational replies": {
        "prompt": "Is rain wet?",
        "chosen": [{"role": "user", "content": "Is rain wet?"}, {"role": "assistant", "content": "Yes, quite wet."}],
        "rejected": [{"role": "user", "content": "Is rain wet?"}, {"role": "assistant", "content": "No."}]},
}


@pytest.mark.parametrize("template", [False, True])
@pytest.mark.parametrize("form", list(PAIR_FORMS))
def test_a_reward_model_trains_on_the_tokens_it_is_scored_on(form, template, tiny_reward_backbone, tmp_path):
    """TRL's RewardTrainer must see the pairs as ``LearnedReward`` scores them at RL time. Before:
    a backbone with a chat template trained on plain "prompt\\nreply" text and was scored on
    the template's text, and template text was tokenised with the tokenizer's special tokens on
    top of the template's own; conversational and implicit-prompt pairs were refused."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from reward_models.learned import LearnedReward
    from rlhf.data import load_preference_dataset
    from rlhf.reward_training import training_pairs, with_eos_and_pad

    file = tmp_path / "pairs.jsonl"
    file.write_text(json.dumps(PAIR_FORMS[form]) + "\n")
    pairs = load_preference_dataset(str(file))
    assert pairs[0]["prompt"] in ("Is rain wet?", [{"role": "user", "content": "Is rain wet?"}])
    tokenizer = with_eos_and_pad(AutoTokenizer.from_pretrained(tiny_reward_backbone))
    if template:
        tokenizer.chat_template = SIMPLE_TEMPLATE
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_backbone)
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path / "out"), report_to=[], bf16=False),
                            processing_class=tokenizer, train_dataset=training_pairs(pairs, tokenizer))
    trained_on = trainer.train_dataset[0]
    scorer = LearnedReward.from_model(model, tokenizer)
    for reply in ("chosen", "rejected"):
        scored = scorer.encode([scorer.format(pairs[0]["prompt"], pairs[0][reply])])["input_ids"][0].tolist()
        assert scored == trained_on[f"{reply}_ids"], (scorer.format(pairs[0]["prompt"], pairs[0][reply]),
                                                     tokenizer.decode(trained_on[f"{reply}_ids"]))


def test_a_reward_beyond_float32_or_needing_a_missing_column_is_named(tmp_path):
    """A stranger's review: a reward of 1e39 passed the finite check and became inf in the float32
    scores (the step was skipped with a warning, exit 0); a parameter the dataset has no column for
    was reported as "add **kwargs to its signature"."""
    with pytest.raises(RewardError, match=r"returned 1e\+39 for sample 0 .*float32's range"):
        CombinedReward._check("f", [1e39], ["c"])
    assert CombinedReward._check("f", [3e38, -3e38], ["a", "b"]) == [3e38, -3e38]

    def needs_solution(completions, solution, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="needs 'solution', which no reward call here passes: it is not a column "
                                          "of the dataset"):
        CombinedReward([needs_solution])(["a"], ["b"], completion_ids=[[1]])
    assert list(CombinedReward([needs_solution])(["a"], ["b"], solution=["x"]).combined()) == [1.0]


def test_a_weighted_reward_sum_past_float32_is_refused():
    """Review of de32e1c: each value was checked, their weighted sum was not (3e38 x weight 2: inf,
    the step skipped, exit 0)."""
    def big(completions, **kwargs):
        return [3e38] * len(completions)

    with pytest.raises(RewardError, match="sample 0's weighted reward sum is 6e\\+38, past float32's range"):
        CombinedReward([big], [2.0])(["p"], ["c"])
    assert list(CombinedReward([big], [1.0])(["p"], ["c"]).combined()) == [3e38]


def test_reward_model_data_a_stranger_brings(tiny_reward_backbone, tmp_path, run_here):
    """Review of 787ff9d: every pair longer than max_length ended in a sampler ValueError
    traceback; a hub-style DatasetDict (train/test) as --eval_dataset was refused with a hint to set
    eval_dataset_split, a key these scripts do not have."""
    import datasets

    from conftest import assert_one_line_error
    from rlhf.data import load_preference_dataset

    rows = [{"prompt": f"Question {i}?", "chosen": "A long and helpful answer.", "rejected": "No."} for i in range(4)]
    saved = tmp_path / "pairs"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(saved)
    assert len(load_preference_dataset(str(saved), "eval")) == 2 and len(load_preference_dataset(str(saved))) == 4
    result = run_here("train_reward_model.py", "--model_name_or_path", str(tiny_reward_backbone), "--dataset",
                      str(saved), "--eval_dataset", str(saved), "--output_dir", str(tmp_path / "rm"), "--max_length", "3")
    assert_one_line_error(result, "is longer than max_length 3 tokens")


@pytest.mark.parametrize("pad", ["none", "tokenizer only"])
def test_a_reward_model_without_a_pad_token_scores_batches_as_one_by_one(pad, tmp_path):
    """An externally trained GPT-2 reward model: no pad token in its tokenizer, or none in its config.
    Before: 'Asking to pad but the tokenizer does not have a padding token' and 'Cannot handle batch
    sizes > 1 if no padding token is defined', each a failed reward call on every batch."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from reward_models.learned import LearnedReward

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                                     n_positions=128, num_labels=1, pad_token_id=None))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    if pad == "none":
        path = tmp_path / "rm" / "tokenizer_config.json"
        settings = json.loads(path.read_text())
        settings.pop("pad_token")
        path.write_text(json.dumps(settings))
    assert (AutoTokenizer.from_pretrained(tmp_path / "rm").pad_token is None) == (pad == "none")
    prompts = ["Say hi", "Describe rain", "Tell a joke"]
    completions = ["Hello!", "It is wet and grey outside today.", "Why?"]
    whole = LearnedReward(str(tmp_path / "rm"), batch_size=8)(prompts, completions)
    split = LearnedReward(str(tmp_path / "rm"), batch_size=1)(prompts, completions)
    assert whole == pytest.approx(split, abs=1e-5) and len(set(whole)) == 3
    # a tokenizer that pads on the left (a policy's, given with the model): GPT-2's learned positions
    # scored a left-padded text elsewhere than alone (a reviewer: 0.75 apart); TRL pads reward inputs right
    left = AutoTokenizer.from_pretrained(tmp_path / "rm", padding_side="left")
    model = GPT2ForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert LearnedReward.from_model(model, left, batch_size=8)(prompts, completions) == pytest.approx(split, abs=1e-5)
