"""rlhf.roofline's FLOP and byte counts against a brute-force count, and random model shapes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from rlhf.roofline import (Machine, ModelShape, StepShape, bounds_report, decode_work, forward_work, prefill_work,
                           step_bounds, update_work)

# hidden 4, intermediate 8, 2 layers, 2 heads of dim 2, 1 KV head, vocabulary 10, tied LM head
TINY = ModelShape(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, vocab=10)
STEP = StepShape(groups=2, group_size=3, prompt_length=5, response_length=4, lora_r=1, no_grad_passes=1)
LINEARS = [("q", 4, 4), ("k", 4, 2), ("v", 4, 2), ("o", 4, 4), ("gate", 4, 8), ("up", 4, 8), ("down", 8, 4)]


def brute_force_attention(queries: int, past: int) -> int:
    """Count query-key pairs one by one: each costs 2 x head_dim FLOPs in QK^T and again in AV."""
    pairs = sum(past + q + 1 for q in range(queries))
    return pairs * 2 * 2 * 2 * 2 * 2  # pairs x (QK^T + AV) x 2 FLOPs x head_dim 2 x heads 2 x layers 2


def brute_force_token(layer0_input_grad: bool, backward: bool, lora_r: int | None, through_head: bool) -> int:
    """FLOPs of one token through every linear (and the LM head), counted layer by layer."""
    flops = 0
    for layer in range(2):
        for name, fan_in, fan_out in LINEARS:
            flops += 2 * fan_in * fan_out  # y = x W^T
            if backward and (layer > 0 or name in ("o", "down") or layer0_input_grad):
                flops += 2 * fan_in * fan_out  # dx = g W
            if lora_r:
                flops += 2 * lora_r * (fan_in + fan_out)  # x A^T, then (x A^T) B^T
                if backward:
                    flops += 2 * lora_r * (fan_out + fan_in + fan_out)  # g B, dA, dB
                    if layer > 0 or name in ("o", "down") or layer0_input_grad:
                        flops += 2 * lora_r * fan_in  # dx's low-rank part: (g B) A
    if through_head:
        flops += 2 * 4 * 10 * (2 if backward else 1)  # logits, and dx of the frozen tied head
    return flops


def test_shape_counts_match_a_transformers_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    assert ModelShape.from_config(config) == TINY
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert TINY.parameters == sum(p.numel() for p in model.parameters()) == 348
    assert TINY.block_weights == 2 * (16 + 8 + 8 + 16 + 32 + 32 + 32) == 288
    assert TINY.first_layer_inputs() == {"q_proj": (4, 4), "k_proj": (4, 2), "v_proj": (4, 2), "gate_proj": (4, 8),
                                         "up_proj": (4, 8)}
    assert TINY.lora_weights(1) == 2 * sum(i + o for _, i, o in LINEARS)


def test_generation_work_by_hand():
    prefill = prefill_work(TINY, STEP)
    # each group's prompt once, its last token left to the first decode step: 2 x 4 tokens
    assert prefill.flops == 2 * 4 * brute_force_token(False, False, None, False) + 2 * brute_force_attention(4, 0)
    assert prefill.bytes == 288 * 4
    decode = decode_work(TINY, STEP)
    assert len(decode) == 4
    for t, work in enumerate(decode):
        # 6 rows, one token each, attending to the 5 + t positions before and at it
        assert work.flops == 6 * brute_force_token(False, False, None, True) + 6 * brute_force_attention(1, 4 + t)
        kv = 2 * 2 * 1 * 2 * (5 + t) * 4  # K and V x layers x KV heads x head_dim x positions x 4 bytes
        assert work.bytes == (288 + 40) * 4 + 6 * kv


def test_update_and_logprob_work_by_hand():
    # blocks: 2 prompts x 4 shared tokens + 6 rows x (last prompt token + the first 3 response
    # tokens: the last one predicts nothing and is not fed); LM head: 6 x 4
    body, head = 2 * 4 + 6 * 4, 6 * 4
    attention = 2 * brute_force_attention(4, 0) + 6 * brute_force_attention(4, 4)
    forward = body * brute_force_token(True, False, 1, False) + head * 2 * 4 * 10 + attention
    assert forward_work(TINY, STEP).flops == forward
    update = body * brute_force_token(False, True, 1, False) + head * 4 * 4 * 10 + 3 * attention
    assert update_work(TINY, STEP).flops == update
    # LoRA: frozen weights 4x (2x for layer 0's q/k/v/gate/up), LoRA 6x; full fine-tuning: 6x everywhere
    lora_free = StepShape(2, 3, 5, 4, lora_r=None)
    assert update_work(TINY, lora_free).flops == body * (6 * 288) + head * 6 * 40 + 3 * attention
    unshared = StepShape(2, 3, 5, 4, lora_r=None, shared_prompt=False)
    assert forward_work(TINY, unshared).flops == (6 * 8 * 2 * 288 + head * 2 * 40
                                                  + 6 * brute_force_attention(4, 0) + 6 * brute_force_attention(4, 4))


def test_bounds_take_the_slower_of_compute_and_memory_per_decode_step():
    # Decode is memory-bound here (bytes / bandwidth >> FLOPs / rate), prefill and update compute-bound.
    machine = Machine(bandwidth=1e3, decode_flops=1e9, batch_flops=1e3)
    bounds = step_bounds(TINY, STEP, machine)
    decode = decode_work(TINY, STEP)
    prefill = prefill_work(TINY, STEP)
    expected = max(prefill.flops / 1e3, prefill.bytes / 1e3) + sum(w.bytes / 1e3 for w in decode)
    assert math.isclose(bounds["generation"].bound_s, expected)
    assert bounds["update"].bound_by == "compute"
    assert math.isclose(bounds["update"].bound_s, update_work(TINY, STEP).flops / 1e3)
    assert math.isclose(bounds["logprobs"].bound_s, forward_work(TINY, STEP).flops / 1e3)  # one no-grad pass
    report = bounds_report(TINY, StepShape(2, 3, 5, 4, no_grad_passes=0), machine,
                           {"generation_s": 2 * bounds["generation"].bound_s, "logprobs_s": 0.01, "update_s": 1.0})
    assert math.isclose(report["generation"]["achieved"], 0.5)
    assert report["logprobs"]["bound_by"] == "nothing" and report["logprobs"]["achieved"] is None
    assert math.isclose(report["step"]["bound_s"], report["generation"]["bound_s"] + report["update"]["bound_s"])


def test_random_model_shapes_are_the_published_ones():
    from rlhf import random_models
    from rlhf.errors import ConfigError

    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    counts = {"random:smollm2-135m": 134_515_008, "random:smollm2-360m": 361_821_120,
              "random:smollm2-1.7b": 1_711_376_384}
    for spec, parameters in counts.items():
        config = random_models.llama_config(random_models.shape_of(spec), tokenizer)
        assert ModelShape.from_config(config).parameters == parameters
    with pytest.raises(ConfigError, match="unknown random model 'random:gpt5'; choose from random:smollm2-135m"):
        random_models.check_spec("random:gpt5")


def test_random_models_are_written_once_and_removed(monkeypatch):
    from pathlib import Path

    from conftest import FIXTURES
    from rlhf import random_models

    tiny = {"vocab_size": 49152, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "tie_word_embeddings": True,
            "rope_theta": 10000.0}
    monkeypatch.setitem(random_models.SHAPES, "tiny", tiny)
    specs = ["random:tiny", "some/dir", "random:tiny"]
    with random_models.materialised(specs, tokenizer_from=str(FIXTURES / "tokenizer")) as paths:
        assert paths["some/dir"] == "some/dir"
        written = Path(paths["random:tiny"])
        assert (written / "model.safetensors").is_file() and (written / "tokenizer.json").is_file()
        assert list(written.parent.iterdir()) == [written]  # the repeated spec was built once
        from rlhf.benchmark import shown_model

        assert shown_model(str(written)) == "random:tiny" and shown_model("some/dir") == "some/dir"  # progress lines
        from transformers import AutoConfig

        assert ModelShape.from_config(AutoConfig.from_pretrained(written)).hidden == 8
    assert not written.exists()


def _config(kind: str):
    from transformers import GPTNeoXConfig, Lfm2Config, LlamaConfig, MixtralConfig, Phi3Config, Qwen2Config

    shape = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {"llama": lambda: LlamaConfig(**shape), "untied llama": lambda: LlamaConfig(**shape, tie_word_embeddings=False),
            "qwen2 (q/k/v bias)": lambda: Qwen2Config(**shape), "phi3 (fused q/k/v, gate/up)": lambda: Phi3Config(**shape),
            "gpt-neox (no gate)": lambda: GPTNeoXConfig(**shape),
            "mixtral (experts)": lambda: MixtralConfig(**shape, num_local_experts=4),
            "lfm2 (conv layers)": lambda: Lfm2Config(**shape, layer_types=["conv", "full_attention"])}[kind]()


@pytest.mark.parametrize("kind", ["llama", "untied llama", "qwen2 (q/k/v bias)", "phi3 (fused q/k/v, gate/up)"])
def test_dense_llama_style_models_are_counted_as_they_are_built(kind):
    config = _config(kind)
    assert ModelShape.from_config(config).matrix_weights_of(config) is None


@pytest.mark.parametrize("kind", ["gpt-neox (no gate)", "mixtral (experts)", "lfm2 (conv layers)"])
def test_models_the_roofline_would_miscount_are_named(kind):
    config = _config(kind)
    assert "weight matrices hold" in ModelShape.from_config(config).matrix_weights_of(config)


@pytest.mark.parametrize("kind", ["mixtral", "gpt2"])
def test_roofline_on_a_model_it_cannot_count_is_a_config_error_before_any_run(kind, tmp_path, run_here):
    """Before, a mixture of experts got the bound of a dense model as large as its config's
    intermediate_size says (wrong, silently), and GPT-2 a traceback-free run whose roofline said
    only "measuring the machine failed: AttributeError"; now one line and exit 2, before any system runs."""
    import torch
    from conftest import FIXTURES, assert_one_line_error
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**ids, n_embd=32, n_layer=2, n_head=4))
    else:
        model = MixtralForCausalLM(_config("mixtral (experts)").__class__(
            **ids, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4))
    model.save_pretrained(tmp_path / kind)
    tokenizer.save_pretrained(tmp_path / kind)
    result = run_here("benchmark.py", "--systems", "ours-grpo", "--model", str(tmp_path / kind), "--roofline", "true",
                      "--steps", "1", "--lengths", "4", "--out", str(tmp_path / "bench.json"))
    assert_one_line_error(result, "--roofline counts the work of dense Llama-style decoders", f"({kind})")
    assert "ours-grpo" not in result.stdout and not (tmp_path / "bench.json").exists()


def test_the_update_does_not_count_the_forward_it_took_from_the_sampler():
    # rlhf.sampled_products: the response positions' frozen forward products (6 rows x 4) were the sampler's
    import dataclasses

    taken = dataclasses.replace(STEP, sampled_forward=True)
    assert update_work(TINY, taken).flops == update_work(TINY, STEP).flops - 2 * TINY.block_weights * 6 * 4
    assert forward_work(TINY, taken).flops == forward_work(TINY, STEP).flops  # a no-grad pass is not the update
    # and the shared prompt prefix's (2 groups x 4 tokens before the last prompt token) were the prefill's
    both = dataclasses.replace(taken, sampled_prefix=True)
    assert update_work(TINY, both).flops == update_work(TINY, taken).flops - 2 * TINY.block_weights * 2 * 4
    unshared = dataclasses.replace(both, shared_prompt=False)  # no shared prefix: no prefill to take
    assert update_work(TINY, unshared).flops == update_work(TINY, dataclasses.replace(taken, shared_prompt=False)).flops
    # and the LM head's forward over the 6 x 4 predicting positions was the sampler's (its kept logits)
    logits = dataclasses.replace(both, sampled_logits=True)
    assert update_work(TINY, logits).flops == update_work(TINY, both).flops - 2 * TINY.lm_head_weights * 6 * 4
    # and the attention's forward over them: 4 positions of each of the 6 rows after the 4 prefix positions
    attention = dataclasses.replace(logits, sampled_attention=True)
    assert update_work(TINY, attention).flops == update_work(TINY, logits).flops - 6 * TINY.attention_flops(4, 4)


def test_a_stopped_build_of_a_random_model_ends_its_builder_and_leaves_nothing(monkeypatch, tmp_path):
    """Ctrl-C or SIGTERM while a random model is built: the builder process ends with the run and
    its folder goes (before, the builder wrote on, 6.4 GB for random:smollm2-1.7b re-created after
    the folder was removed, and the run waited for it to finish, helper-50)."""
    import multiprocessing
    import signal
    import tempfile
    import time

    from rlhf import random_models

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def stop(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 0.5)  # the builder is still importing torch then
    try:
        with pytest.raises(KeyboardInterrupt):
            with random_models.materialised(["random:smollm2-135m"]):
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    left = multiprocessing.active_children()
    for child in left:  # on the old code: terminated here, so the test does not leave it running
        child.terminate()
        child.join()
    assert not left
    time.sleep(1)
    assert not list(tmp_path.glob("rlhf-random-models-*"))


def test_report_numbers_show_no_negative_zero_and_no_zero_share():
    """A KL estimate of -4e-5 is 0.000, not -0.000; a phase at 0.2% of its bound is under 1%, not 0%
    (found by a reviewer in the race's table and a roofline of a tiny Gemma2)."""
    from rlhf.benchmark_report import _number, _percent

    assert _number(-4e-5) == "0.000" and _number(-0.0) == "0.000" and _number(-0.0006) == "-0.001"
    assert _number(-1.25, 1) == "-1.2" and _number(float("nan")) == "—" and _number(None) == "—"
    assert _percent(0.002) == "<1%" and _percent(0.006) == "1%" and _percent(0.0) == "0%" and _percent(0.5) == "50%"
    assert _percent(None) == "—"


def test_roofline_refuses_a_sliding_window_the_sequences_may_pass(tmp_path, run_here):
    """rlhf.roofline counts full causal attention and each row's whole KV cache: a review's Mistral
    with sliding_window 4 ran --roofline at 4 and 8 new tokens (51-token prompts) and got a bound
    counting every key; now one line and exit 2 before any system runs, and a window wider than
    the sequences (Mistral's 4096 at short lengths) or none (Qwen2 without use_sliding_window) passes."""
    from conftest import assert_one_line_error
    from transformers import MistralConfig, Qwen2Config

    from rlhf.benchmark import check_full_attention
    from rlhf.errors import ConfigError

    shape = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for name, config in {"narrow": MistralConfig(**shape, sliding_window=4),
                         "wide": MistralConfig(**shape, sliding_window=4096),
                         "qwen2": Qwen2Config(**shape),
                         "qwen2-window": Qwen2Config(**shape, use_sliding_window=True, sliding_window=64,
                                                     max_window_layers=0)}.items():
        config.save_pretrained(tmp_path / name)
    check_full_attention(str(tmp_path / "wide"), "wide", 256)
    check_full_attention(str(tmp_path / "qwen2"), "qwen2", 256)
    with pytest.raises(ConfigError, match="sliding-window layers of 64 tokens"):
        check_full_attention(str(tmp_path / "qwen2-window"), "qwen2-window", 8)
    result = run_here("benchmark.py", "--systems", "ours-grpo", "--model", str(tmp_path / "narrow"), "--roofline",
                      "true", "--steps", "1", "--lengths", "4", "8", "--out", str(tmp_path / "bench.json"))
    assert_one_line_error(result, "--roofline counts full causal attention", "sliding-window layers of 4 tokens")
    assert "ours-grpo" not in result.stdout and not (tmp_path / "bench.json").exists()
