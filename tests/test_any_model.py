"""Any causal LM (issue 18): stop sets from generation_config (Llama-3, Qwen2.5, Gemma style),
tokenizers with neither pad nor unk token, chat templates that reject a system role, and
untied LM heads, each on a tiny random model built to have that property."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_one_line_error, build_tiny_model, tiny_args
from transformers import GenerationConfig

from rlhf.cli import ALGORITHM_DEFAULTS
from rlhf.config import RLConfig
from rlhf.data import format_prompt
from rlhf.models import load_base_model, load_tokenizer, stop_token_ids
from rlhf.rollout import generate_rollout, response_mask, sample_responses

REWARD = f"{FIXTURES / 'rewards.py'}:char_diversity"
EOS = 2  # the fixture tokenizer's <|im_end|>
TURN_END = 17  # "!": an ordinary (not special) token standing in for a turn-end id such as Llama-3's <|eot_id|>
PROMPTS = ["Hi", "Tell me a story", "What is 2 + 2?", "Name a colour", "Why is the sky blue?", "Hello there"]


def build_model(directory: Path, *, stop_ids: list[int] | None = None, pad_and_unk: bool = True,
                tie_word_embeddings: bool = True) -> Path:
    """The tiny model with generation_config.json's eos_token_id = ``stop_ids`` and/or a tokenizer
    whose config names neither a pad nor an unknown token."""
    build_tiny_model(directory, tie_word_embeddings=tie_word_embeddings)
    if stop_ids is not None:
        generation = GenerationConfig.from_pretrained(directory)
        generation.eos_token_id = stop_ids
        generation.save_pretrained(directory)
    if not pad_and_unk:
        path = directory / "tokenizer_config.json"
        settings = json.loads(path.read_text())
        settings.pop("pad_token"), settings.pop("unk_token")
        path.write_text(json.dumps(settings))
    return directory


@pytest.fixture(scope="module")
def listed_stop_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("listed-stop"), stop_ids=[EOS, TURN_END])


def favour(model: torch.nn.Module, logits: dict[int, float]) -> torch.utils.hooks.RemovableHandle:
    """Add ``logits`` to the LM head's output: the random model then emits those tokens often."""
    head = model.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    for token, value in logits.items():
        bias[token] = value
    return head.register_forward_hook(lambda module, args, output: output + bias)


def check_rows(rollout, stops: list[int], tokenizer, max_new_tokens: int) -> None:
    """Each row ends at its first stop id: mask, attention, padding, EOS flag and completion agree."""
    pad = tokenizer.pad_token_id
    prompt_width = rollout.input_ids.shape[1] - rollout.response_length
    for row in range(len(rollout)):
        ids = rollout.response_ids[row].tolist()
        first = next((i for i, token in enumerate(ids) if token in stops), None)
        length = first + 1 if first is not None else max_new_tokens
        assert bool(rollout.eos_found[row]) == (first is not None), (row, ids)
        assert rollout.mask[row].tolist() == [1.0] * length + [0.0] * (len(ids) - length), (row, ids)
        assert rollout.attention_mask[row, prompt_width:].tolist() == [1] * length + [0] * (len(ids) - length)
        assert ids[length:] == [pad] * (len(ids) - length)
        text_ids = ids[:first] if first is not None else ids
        assert rollout.completions[row] == tokenizer.decode(text_ids, skip_special_tokens=True)


def make_trainer(model_dir: Path, output_dir: Path, algorithm: str = "grpo", **overrides):
    from rlhf.trainer import RLTrainer

    return RLTrainer(RLConfig(**{
        **ALGORITHM_DEFAULTS[algorithm], "model_name_or_path": str(model_dir), "output_dir": str(output_dir),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 4, "mini_batch_size": 8, "ppo_epochs": 1,
        "max_new_tokens": 16, "max_prompt_length": 64, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2,
        "save_steps": 0, "num_samples_to_log": 0, "reward_funcs": [REWARD], **overrides,
    }))


# ---------------------------------------------------------------------------- stop sets


def test_response_mask_ends_at_the_first_of_any_stop_id():
    ids = torch.tensor([
        [5, 7, 2, 2, 2],   # ends at the second stop id; pad (= EOS 2, itself a stop id) after it
        [5, 6, 8, 9, 4],   # no stop id: truncated
        [2, 2, 2, 2, 2],   # EOS at once, then pad == EOS
        [5, 6, 2, 7, 2],   # EOS first; the later 7 is after the end
    ])
    mask, eos_found = response_mask(ids, [2, 7])
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert eos_found.tolist() == [True, False, True, True]
    one_id, _ = response_mask(ids, 2)
    assert one_id.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits always make token 3 the argmax."""

    def forward(self, input_ids, cache=None, **kwargs):
        from types import SimpleNamespace

        logits = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0])
        return SimpleNamespace(logits=logits.expand(*input_ids.shape, 5), cache=cache)


def test_sampler_stops_at_any_stop_id():
    ids = torch.ones(3, 2, dtype=torch.long)
    tokens, _ = sample_responses(FixedLogits(), ids, torch.ones_like(ids), max_new_tokens=4, temperature=0.0, top_p=1.0,
                                 eos_token_ids=[0, 3], pad_token_id=4)
    assert tokens.tolist() == [[3]] * 3  # the argmax is the second stop id: every row ends at once
    tokens, _ = sample_responses(FixedLogits(), ids, torch.ones_like(ids), max_new_tokens=4, temperature=0.0, top_p=1.0,
                                 eos_token_ids=0, pad_token_id=4)
    assert tokens.tolist() == [[3] * 4] * 3


def test_stop_token_ids_come_from_generation_config(listed_stop_dir, tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(listed_stop_dir))
    assert stop_token_ids(str(listed_stop_dir), tokenizer) == [EOS, TURN_END]
    assert stop_token_ids(load_base_model(str(listed_stop_dir)), tokenizer) == [EOS, TURN_END]
    assert stop_token_ids(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir))) == [EOS]  # the default model
    # Tokenizer EOS first, no duplicates; an int is one id.
    generation = GenerationConfig.from_pretrained(listed_stop_dir)
    generation.eos_token_id = 9
    generation.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((listed_stop_dir / "config.json").read_text())
    assert stop_token_ids(str(tmp_path), tokenizer) == [EOS, 9]
    # Without generation_config.json the model config's eos_token_id (int or list) counts.
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": [TURN_END, EOS]}))
    assert stop_token_ids(str(tmp_path), tokenizer) == [EOS, TURN_END]


def test_training_rollout_and_evaluation_stop_at_the_generation_config_ids(listed_stop_dir, tmp_path):
    """The trainer's rollout, its metrics and rlhf.evaluate's sampling end responses at TURN_END."""
    from rlhf.evaluate import sample_and_score

    trainer = make_trainer(listed_stop_dir, tmp_path)
    favour(trainer.unwrapped.policy, {TURN_END: 10.0})
    torch.manual_seed(0)
    rollout = trainer.rollout()
    check_rows(rollout, [EOS, TURN_END], trainer.tokenizer, trainer.config.max_new_tokens)
    assert rollout.eos_found.float().mean() >= 0.75, rollout.response_ids  # old code: 0, every row ran to 16
    assert rollout.mask.sum(1).max() > 1  # not only one-token responses
    metrics = trainer.train_step()
    assert metrics["eos_rate"] >= 0.75 and metrics["response_length_mean"] < trainer.config.max_new_tokens
    assert trainer.stop_ids == [EOS, TURN_END]
    records = sample_and_score(trainer.unwrapped.policy, trainer.tokenizer, trainer.dataset, [0, 1, 2], trainer.reward,
                               base=None, num_samples=2, max_new_tokens=16, eos_token_ids=trainer.stop_ids)
    assert sum(r["eos"] for r in records) >= 4
    assert all(r["eos"] or r["tokens"] == 16 for r in records)


def fsdp_rollout(model, tokenizer, texts: list[str], prompts: list[str], *, temperature: float = 1.0,
                 top_p: float = 1.0):
    """generate_rollout down FSDP2's path (synced_gpus=True). Synced generate needs a process group;
    one process computes the same without it, so the model's generate gets synced_gpus=False."""
    generate = model.generate
    model.generate = lambda **kwargs: generate(**{**kwargs, "synced_gpus": False})
    try:
        return generate_rollout(model, tokenizer, texts, prompts=prompts, group_ids=list(range(len(prompts))),
                                columns={}, max_prompt_length=64, max_new_tokens=16, temperature=temperature,
                                top_p=top_p, synced_gpus=True)
    finally:
        del model.generate  # the class's generate again


def test_fsdp_generate_path_stops_at_the_models_stop_ids(listed_stop_dir):
    """Under FSDP2 transformers' generate samples; it gets the whole stop set (read off the model)."""
    tokenizer = load_tokenizer(str(listed_stop_dir))
    model = load_base_model(str(listed_stop_dir)).eval()
    favour(model, {TURN_END: 10.0})
    torch.manual_seed(0)
    rollout = fsdp_rollout(model, tokenizer, [format_prompt(p, tokenizer) for p in PROMPTS], PROMPTS)
    check_rows(rollout, [EOS, TURN_END], tokenizer, 16)
    assert rollout.eos_found.float().mean() >= 0.75, rollout.response_ids


# ---------------------------------------------------------------------------- no pad token


def test_tokenizer_without_pad_or_unk_pads_with_eos_and_masks_stay_right(tmp_path):
    """Llama-3 style: no pad, no unk, so pad = EOS, a stop id itself; rows end at EOS or at the
    turn-end id and the EOS padding after either is never part of a response."""
    model_dir = build_model(tmp_path / "model", stop_ids=[EOS, TURN_END], pad_and_unk=False)
    tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == EOS
    stops = stop_token_ids(str(model_dir), tokenizer)
    model = load_base_model(str(model_dir)).eval()
    favour(model, {TURN_END: 9.5, EOS: 9.5})
    torch.manual_seed(0)
    texts = [format_prompt(p, tokenizer) for p in PROMPTS] * 2
    rollout = generate_rollout(model, tokenizer, texts, prompts=PROMPTS * 2, group_ids=list(range(len(texts))),
                               columns={}, max_prompt_length=64, max_new_tokens=16, temperature=1.0, top_p=1.0,
                               eos_token_ids=stops)
    check_rows(rollout, [EOS, TURN_END], tokenizer, 16)
    last = [rollout.response_ids[row, int(rollout.mask[row].sum()) - 1].item() for row in range(len(rollout))]
    assert EOS in last and TURN_END in last, rollout.response_ids  # both kinds of ending happened
    assert stops == [EOS, TURN_END]
    # The prompt's left padding (EOS as well) stays outside the attention mask.
    prompt_width = rollout.input_ids.shape[1] - rollout.response_length
    assert rollout.attention_mask[:, :prompt_width].sum(1).tolist() == [
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_a_base_models_prompts_start_with_its_bos_as_trl_tokenises_them(tiny_model_dir, tmp_path, run_here):
    """A tokenizer without a chat template (a base model: Llama-2, Mistral, Gemma) that adds a BOS:
    TRL and transformers tokenise a plain-text prompt with it, and the model was trained so; ours
    tokenised every prompt without special tokens and the BOS was missing. A chat template writes
    its own BOS into the text, which keeps being tokenised as it is."""
    import shutil

    from datasets import Dataset

    from rlhf.config import RLConfig
    from rlhf.data import check_prompt_lengths

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = load_tokenizer(str(base))
    tokenizer.chat_template, tokenizer.add_bos_token = None, True
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(base)
    tokenizer = load_tokenizer(str(base))
    bos = tokenizer.bos_token_id
    assert not tokenizer.chat_template
    assert tokenizer("Hi")["input_ids"] == [bos, *tokenizer("Hi", add_special_tokens=False)["input_ids"]]
    texts = [format_prompt(p, tokenizer) for p in PROMPTS]
    assert texts == PROMPTS  # plain text
    torch.manual_seed(0)
    rollout = generate_rollout(load_base_model(str(base)).eval(), tokenizer, texts, prompts=PROMPTS,
                               group_ids=list(range(len(texts))), columns={}, max_prompt_length=64, max_new_tokens=2,
                               temperature=1.0, top_p=1.0)
    prompt_width = rollout.input_ids.shape[1] - rollout.response_length
    for row, text in enumerate(texts):
        kept = rollout.input_ids[row, :prompt_width][rollout.attention_mask[row, :prompt_width].bool()].tolist()
        assert kept == tokenizer(text)["input_ids"] and kept[0] == bos  # TRL: processing_class(text=prompts)
    # max_prompt_length counts the BOS too: a prompt of exactly that many tokens with it is cut
    longest = max(len(tokenizer(text)["input_ids"]) for text in texts)
    config = RLConfig(model_name_or_path=str(base), max_prompt_length=longest - 1, prompt_overflow="error")
    with pytest.raises(Exception, match="longer than max_prompt_length"):
        check_prompt_lengths(Dataset.from_dict({"prompt": PROMPTS}), tokenizer, config, "prompts", warn=False)
    # a limit that holds only the BOS: transformers cannot cut below it and would pass prompts whole
    result = run_here("train_grpo.py", *tiny_args(base, tmp_path / "run", "--max_prompt_length", "1"))
    assert_one_line_error(result, "max_prompt_length 1 leaves no room for a prompt: the tokenizer adds 1 special")
    assert not [path for path in (tmp_path / "run").rglob("*") if path.is_file()]  # nothing written
    assert run_here("train_grpo.py", *tiny_args(base, tmp_path / "trained", "--max_steps", "1")).returncode == 0
    result = run_here("evaluate.py", "--checkpoints", str(tmp_path / "trained" / "final"), "--num_prompts", "2",
                      "--num_samples", "1", "--max_new_tokens", "2", "--max_prompt_length", "1",
                      "--output_dir", str(tmp_path / "eval"))
    assert_one_line_error(result, "max_prompt_length 1 leaves no room for a prompt")
    templated = load_tokenizer(str(tiny_model_dir))  # with a template: no second BOS from the tokenizer
    templated.add_bos_token = True
    text = format_prompt(PROMPTS[0], templated)
    rollout = generate_rollout(load_base_model(str(tiny_model_dir)).eval(), templated, [text], prompts=PROMPTS[:1],
                               group_ids=[0], columns={}, max_prompt_length=256, max_new_tokens=1, temperature=1.0,
                               top_p=1.0)
    assert rollout.input_ids[0, :-1].tolist() == templated(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- chat templates


GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def test_chat_template_without_system_role_gets_the_system_message_in_the_first_user_turn():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    system_first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # A template that accepts a system role: byte for byte what the template itself renders.
    for prompt in ("Hi", system_first):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        assert format_prompt(prompt, tokenizer) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = GEMMA_STYLE_TEMPLATE
    bos = tokenizer.bos_token
    assert format_prompt(system_first, tokenizer) == (
        f"{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert format_prompt("Hi", tokenizer) == f"{bos}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert format_prompt([{"role": "system", "content": "Be brief."}], tokenizer) == (
        f"{bos}<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>model\n")


# ---------------------------------------------------------------------------- untied LM head


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj", "lm_head"]])
def test_untied_lm_head_trains_one_step_and_saves(tmp_path, targets):
    """tie_word_embeddings False (Llama-3-8B, Qwen2.5-7B): policy, reference, value head and the
    saved adapter work with an LM head of its own, also with LoRA on that head."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model_dir = build_model(tmp_path / "model", tie_word_embeddings=False)
    trainer = make_trainer(model_dir, tmp_path / "run", "ppo", lora_target_modules=targets)
    base = trainer.unwrapped.policy.get_base_model()
    assert base.lm_head.weight.data_ptr() != base.model.embed_tokens.weight.data_ptr()
    frozen = {name: p.detach().clone() for name, p in base.named_parameters() if not p.requires_grad}
    trained = {name: p.detach().clone() for name, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    assert any("lm_head" in name for name in trained) == ("lm_head" in targets)
    trainer.train_step()
    after = dict(trainer.unwrapped.named_parameters())
    assert any(not torch.equal(after[name], value) for name, value in trained.items() if "lora_B" in name)
    assert not torch.equal(after["value_head.summary.weight"], trained["value_head.summary.weight"])
    for name, value in frozen.items():  # the reference (adapter off) stays the base model
        assert torch.equal(dict(base.named_parameters())[name], value), name
    final = trainer.save_final()
    reloaded = PeftModel.from_pretrained(load_base_model(str(model_dir)), str(final)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    policy = trainer.unwrapped.policy.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
        assert torch.allclose(reference, load_base_model(str(model_dir))(input_ids=ids).logits, atol=1e-5)
    head = load_file(str(final / "value_head.safetensors"))
    assert torch.equal(head["summary.weight"], after["value_head.summary.weight"].detach().float())
    # Only LoRA tensors are saved (not the frozen vocab x hidden head), so the adapter can start a
    # new run: its merged policy is the trained one.
    assert all(".lora_" in key for key in load_file(str(final / "adapter_model.safetensors")))
    chained = make_trainer(model_dir, tmp_path / "chained", "ppo", init_adapter=str(final))
    with torch.no_grad():
        assert torch.allclose(chained.unwrapped.policy.eval()(input_ids=ids).logits, policy(input_ids=ids).logits,
                              atol=1e-5)


# ---------------------------------------------------------------------------- hybrid models


@pytest.fixture(scope="module")
def hybrid_model_dir(tmp_path_factory) -> Path:
    """A tiny LFM2: a short-convolution layer, then an attention layer (the hybrid layout of LFM2,
    Qwen3-Next and Granite-4: part of the cache is conv or recurrent state, not keys and values)."""
    from transformers import AutoTokenizer, Lfm2Config, Lfm2ForCausalLM

    directory = tmp_path_factory.mktemp("tiny-lfm2")
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    config = Lfm2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    Lfm2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_hybrid_model_trains_with_the_default_prompt_sharing(hybrid_model_dir, tmp_path):
    """share_prompt_prefix is on by default; a hybrid model's cache cannot be copied row by row
    (transformers' linear-attention layers have no row selection), so its rows prefill their own
    prompts, in the rollout and in the update (this crashed in ``batch_select_indices``)."""
    trainer = make_trainer(hybrid_model_dir, tmp_path / "run")
    trained = {name: p.detach().clone() for name, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    metrics = trainer.train_step()
    assert metrics["reward_mean"] > 0
    after = dict(trainer.unwrapped.named_parameters())
    assert any(not torch.equal(after[name], value) for name, value in trained.items() if "lora_B" in name)


def test_hybrid_model_samples_the_same_with_and_without_prompt_sharing(hybrid_model_dir):
    from rlhf.models import PolicyWithValue, add_lora, shared_prompt_cache
    from rlhf.rollout import forward_response

    tokenizer = load_tokenizer(str(hybrid_model_dir))
    policy = add_lora(load_base_model(str(hybrid_model_dir)), 4, 8, 0.0, ["all-linear"]).eval()
    prompts = ["Hi", "Hi", "Tell me a story", "Tell me a story"]
    ids = tokenizer(["Hi", "Hi"], return_tensors="pt").input_ids
    assert shared_prompt_cache(policy, ids, torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids),
                               ids.shape[1] - 1) is None
    runs = []
    for share in (False, True):
        torch.manual_seed(3)
        rollout = generate_rollout(policy, tokenizer, prompts, prompts=prompts, group_ids=[0, 0, 1, 1], columns={},
                                   max_prompt_length=32, max_new_tokens=6, temperature=1.0, top_p=1.0,
                                   share_prompt_prefix=share)
        model = PolicyWithValue(policy, None, share_prompt_prefix=share)
        with torch.no_grad():
            logprobs, _, _ = forward_response(model, rollout, slice(None), 1.0)
        runs.append((rollout, logprobs))
    (plain, plain_logprobs), (shared, shared_logprobs) = runs
    assert torch.equal(plain.input_ids, shared.input_ids)
    assert torch.equal(plain.sampler_logprobs, shared.sampler_logprobs) and torch.equal(plain_logprobs, shared_logprobs)


# ---------------------------------------------------------------------------- state-space and recurrent models


def _state_model(kind: str, directory: Path) -> Path:
    """A tiny random Mamba or RecurrentGemma (a recurrent block, then local attention), saved with
    the fixture tokenizer."""
    from transformers import (AutoTokenizer, MambaConfig, MambaForCausalLM, RecurrentGemmaConfig,
                              RecurrentGemmaForCausalLM)

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, hidden_size=32, num_hidden_layers=2)
    torch.manual_seed(0)
    if kind == "mamba":
        model = MambaForCausalLM(MambaConfig(**ids, state_size=8, expand=2))
    else:
        model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
            **ids, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8, lru_width=32,
            attention_window_size=8, block_types=["recurrent", "attention"]))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory) -> Path:
    return _state_model("mamba", tmp_path_factory.mktemp("tiny-mamba"))


@pytest.fixture(scope="module")
def recurrent_gemma_dir(tmp_path_factory) -> Path:
    return _state_model("recurrent_gemma", tmp_path_factory.mktemp("tiny-recurrent-gemma"))


def _forward_logprobs(model, rollout) -> torch.Tensor:
    """[B, T] logprobs of the response tokens under one forward of the whole left-padded rows."""
    positions = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions).logits
    width = rollout.response_ids.shape[1]
    predicting = logits[:, -width - 1:-1].double()
    return torch.log_softmax(predicting, -1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1).float()


STATE_PROMPTS = ["Hi", "Hi", "Tell me a long story about the sea", "Tell me a long story about the sea"]


def _rollout(model, tokenizer, row_seeds=None):
    return generate_rollout(model, tokenizer, STATE_PROMPTS, prompts=STATE_PROMPTS, group_ids=[0, 0, 1, 1], columns={},
                            max_prompt_length=32, max_new_tokens=8, temperature=1.0, top_p=1.0, row_seeds=row_seeds,
                            share_prompt_prefix=True)


def test_mamba_decode_steps_take_no_attention_mask_as_in_generate(mamba_dir, tiny_model_dir):
    """Mamba's mixer multiplies a step's states by the attention mask; the sampler handed every decode
    step the mask over all columns, which broadcast the one new position to all of them: the logits
    and the sampled logprobs were wrong (off by up to 0.23 here; a PPO step saw sampler/logprob_abs_diff_max
    0.76). Decode steps now get what generate gives each model (none for Mamba), and each sampled logprob
    is the one a forward of the whole left-padded row gives."""
    from rlhf.kv_cache import decode_steps_take_attention_mask

    tokenizer = load_tokenizer(str(mamba_dir))
    model = load_base_model(str(mamba_dir)).eval()
    assert not decode_steps_take_attention_mask(model)
    assert decode_steps_take_attention_mask(load_base_model(str(tiny_model_dir)))
    for seeds in (None, [1, 2, 3, 4]):
        torch.manual_seed(0)
        rollout = _rollout(model, tokenizer, seeds)
        assert rollout.input_ids[0, 0] == tokenizer.pad_token_id  # the short prompts are left-padded
        diff = ((_forward_logprobs(model, rollout) - rollout.sampler_logprobs) * rollout.mask).abs().max()
        assert diff < 1e-5, diff


def test_mamba_trains_with_the_sampler_logprobs_of_the_update(mamba_dir, tmp_path):
    trainer = make_trainer(mamba_dir, tmp_path / "run", "ppo", lora_target_modules=["x_proj", "in_proj"])
    metrics = trainer.train_step()
    assert metrics["sampler/logprob_abs_diff_max"] < 1e-4, metrics["sampler/logprob_abs_diff_max"]


def test_model_that_returns_no_cache_samples_through_its_own_generate(recurrent_gemma_dir, tmp_path):
    """RecurrentGemma keeps its recurrent state in its modules and returns no cache: the KV-cache
    sampler crashed on its first step ('CausalLMOutput' has no attribute 'cache'). Such a model
    samples through transformers' generate with the same distribution (the recorder's logprobs equal
    a forward's), per row from its seed where evaluation gives seeds, and trains."""
    from rlhf.kv_cache import forward_returns_cache

    tokenizer = load_tokenizer(str(recurrent_gemma_dir))
    model = load_base_model(str(recurrent_gemma_dir)).eval()
    assert not forward_returns_cache(model)
    torch.manual_seed(0)
    rollout = _rollout(model, tokenizer)
    assert ((_forward_logprobs(model, rollout) - rollout.sampler_logprobs) * rollout.mask).abs().max() < 1e-5
    state = torch.get_rng_state()
    seeded = [_rollout(model, tokenizer, [5, 6, 7, 8]) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)  # the seeded rows leave the global RNG alone
    assert torch.equal(seeded[0].response_ids, seeded[1].response_ids)
    assert ((_forward_logprobs(model, seeded[0]) - seeded[0].sampler_logprobs) * seeded[0].mask).abs().max() < 1e-5
    trainer = make_trainer(recurrent_gemma_dir, tmp_path / "run", eval_steps=1, eval_num_prompts=2)
    metrics = trainer.train_step()
    assert metrics["reward_mean"] > 0 and "eval/reward_mean" in metrics


def test_output_projection_probe_passes_a_mask(tmp_path, monkeypatch):
    """The probe that decides chunked logprobs runs ids 0..2, which hold the fixture's pad id: without a
    mask GPT-2 told every user "We strongly recommend passing in an attention_mask" at startup."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from transformers.modeling_utils import PreTrainedModel

    from rlhf.models import add_lora, plain_output_projection

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                       pad_token_id=tokenizer.pad_token_id))
    unmasked = []
    original = PreTrainedModel.warn_if_padding_and_no_attention_mask
    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask",
                        lambda self, ids, mask: (unmasked.append(mask is None), original(self, ids, mask))[1])
    assert plain_output_projection(add_lora(model, 4, 8, 0.0, ["c_attn"]))
    assert unmasked and not any(unmasked)


def test_generate_path_gives_padding_logprob_0_with_top_p(listed_stop_dir):
    """generate's recorder gives the pad after a row's end -inf when the pad is outside the top-p
    nucleus; the rollout multiplied by the mask (-inf * 0 = NaN), and importance-sampling correction
    then trained to NaN. Padding is now 0, as documented."""
    tokenizer = load_tokenizer(str(listed_stop_dir))
    model = load_base_model(str(listed_stop_dir)).eval()
    favour(model, {TURN_END: 6.0})
    torch.manual_seed(0)
    rollout = fsdp_rollout(model, tokenizer, [format_prompt(p, tokenizer) for p in PROMPTS], PROMPTS,
                           temperature=0.7, top_p=0.5)
    ended_early = rollout.mask.sum(1) < rollout.mask.shape[1]
    assert ended_early.any() and torch.isfinite(rollout.sampler_logprobs).all()
    assert (rollout.sampler_logprobs[rollout.mask == 0] == 0).all()


def test_generate_path_samples_the_policy_not_the_generation_config(recurrent_gemma_dir, tmp_path):
    """A model's generation_config (repetition_penalty, suppress_tokens) reached generate's processors,
    so the fallback drew from, and recorded, another distribution than the policy's (1.1e-3 off here;
    0.945 in a reviewer's run with suppress_tokens); generate now runs every processor at its neutral value."""
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(str(recurrent_gemma_dir))
    model = load_base_model(str(recurrent_gemma_dir)).eval()
    model.generation_config = GenerationConfig(repetition_penalty=3.0, suppress_tokens=list(range(3, 40)),
                                               no_repeat_ngram_size=1, min_new_tokens=4)
    torch.manual_seed(0)
    rollout = _rollout(model, tokenizer)
    assert ((_forward_logprobs(model, rollout) - rollout.sampler_logprobs) * rollout.mask).abs().max() < 1e-5
    # and settings that change what generate returns or needs (a dict; a tokenizer for stop strings) crashed
    model.generation_config = GenerationConfig(return_dict_in_generate=True, stop_strings=["sea"])
    rollout = _rollout(model, tokenizer)
    assert ((_forward_logprobs(model, rollout) - rollout.sampler_logprobs) * rollout.mask).abs().max() < 1e-5


def test_no_cache_probe_and_wrapped_mamba(mamba_dir):
    """The cache probe runs in eval mode (Mamba with gradient checkpointing in training mode returns no
    cache, and the answer was remembered: every later rollout went through generate); a plain wrapper
    around Mamba (no prepare_inputs_for_generation) is tried and decodes without the mask (it got the
    mask, and logprobs 0.79 off)."""
    from rlhf.kv_cache import decode_steps_take_attention_mask, forward_returns_cache

    tokenizer = load_tokenizer(str(mamba_dir))
    model = load_base_model(str(mamba_dir))
    model.gradient_checkpointing_enable()
    model.train()
    assert forward_returns_cache(model) and model.training  # its mode is put back

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    wrapped = Wrapper(load_base_model(str(mamba_dir)).eval())
    assert not decode_steps_take_attention_mask(wrapped)
    # in bfloat16 too, where the decode step rounds far from the forward either way (a fixed tolerance said "mask")
    assert not decode_steps_take_attention_mask(Wrapper(load_base_model(str(mamba_dir)).to(torch.bfloat16).eval()))
    torch.manual_seed(0)
    rollout = _rollout(wrapped, tokenizer)
    assert ((_forward_logprobs(wrapped.inner, rollout) - rollout.sampler_logprobs) * rollout.mask).abs().max() < 1e-5


def test_rwkv_samples_row_by_row_and_trains(tmp_path):
    """RWKV returns its state under another name (no cache): the sampler crashed, and the prompt
    sharing in the update too; transformers' batched generate steps it wrongly at 2+ rows, so the
    fallback runs row by row and the sampler's logprobs are the update's."""
    from transformers import AutoTokenizer, RwkvConfig, RwkvForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    torch.manual_seed(0)
    RwkvForCausalLM(RwkvConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                               intermediate_size=64, context_length=128, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                    ).save_pretrained(tmp_path / "rwkv")
    tokenizer.save_pretrained(tmp_path / "rwkv")
    trainer = make_trainer(tmp_path / "rwkv", tmp_path / "run", "ppo", max_prompt_length=32,
                           lora_target_modules=["key", "value", "receptance"])
    metrics = trainer.train_step()
    assert metrics["sampler/logprob_abs_diff_max"] < 1e-4, metrics["sampler/logprob_abs_diff_max"]
    # FSDP2's path (synced generate; one process computes the same without a process group) also goes row by row
    model = load_base_model(str(tmp_path / "rwkv")).eval()
    torch.manual_seed(0)
    rollout = fsdp_rollout(model, tokenizer, STATE_PROMPTS, STATE_PROMPTS)
    assert ((_forward_logprobs(model, rollout) - rollout.sampler_logprobs) * rollout.mask).abs().max() < 1e-5


def test_converting_the_embedded_model_leaves_the_seeded_generator_alone(tiny_model_dir, tmp_path, monkeypatch):
    """The embedded model's one-time conversion (GGUF -> safetensors) builds a fresh model, whose
    random initialisation would draw from the global generator the trainer has seeded by then: a
    run that converts would sample otherwise than the same run once the copy exists. (The GGUF
    load is stood in for by the tiny model: the same calls, seconds instead of ~30 s.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf import models

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_EMBEDDED_GGUF", ("rlhf", "stand-in.gguf"))  # an installed package
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda path, gguf_file=None: tokenizer)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda path, gguf_file=None, dtype=None: model)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    target = models.embedded_model_dir()
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert torch.equal(torch.get_rng_state(), before)


def test_a_value_head_reads_hidden_states_narrower_than_hidden_size(tmp_path, tiny_model_dir):
    """OPT-350m projects its hidden states to word_embed_proj_dim before the LM head. Before, PPO's
    value head was hidden_size wide: 'mat1 and mat2 shapes cannot be multiplied (16x16 and 32x1)'."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=16,
                                     num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=128,
                                     do_layer_norm_before=False, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    trainer = make_trainer(tmp_path / "opt", tmp_path / "run", "ppo", max_prompt_length=32,
                           lora_target_modules=["q_proj", "v_proj"])
    metrics = trainer.train_step()
    assert trainer.model.value_head.summary.in_features == 16
    assert math.isfinite(metrics["value_loss"]) and math.isfinite(metrics["policy_loss"]), metrics
    from rlhf.models import last_hidden_size

    assert last_hidden_size(model) == 16 and last_hidden_size(load_base_model(str(tiny_model_dir))) == 32
