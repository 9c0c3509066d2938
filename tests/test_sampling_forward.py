"""The sampler's own forward (rlhf.sampling_forward) gives the model's logits and cache bitwise."""

import pytest
import torch
from torch import nn

from rlhf import cpu_linear
from rlhf.kv_cache import preallocated
from rlhf.models import add_lora, inference_linears, merged_lora_weights
from rlhf.rollout import sample_responses
from rlhf.sampling_forward import SamplingForward, sampling_forward

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_packing_usable(), reason="this torch build cannot pack oneDNN weights")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(kind: str, hidden: int = 512, **extra) -> nn.Module:
    """A 2-layer model of ``kind`` whose projections are large enough (>= 2**16 weights) to go to oneDNN."""
    import transformers

    common = dict(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256) | extra
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v bias
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),  # per-head q/k norms
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**common))
    with torch.no_grad():  # non-trivial norms and biases, so a skipped one would show
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.uniform_(0.5, 1.5)
    if kind == "mistral":
        model.config.sliding_window = None
    return model.eval()


def _policy(kind: str, **extra) -> nn.Module:
    policy = add_lora(_model(kind, **extra), 4, 8, 0.0, TARGETS)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return policy.eval()


def _prompts(rows: int = 6, length: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in some rows
    mask[rows - 1, :2] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _both_ways(forward, model, ids, mask, positions, steps=3):
    """Logits of a prefill and ``steps`` decode steps, through ``forward`` and through ``model``."""
    results = []
    for run in (forward, model):
        out = run(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = preallocated(out.cache, steps), [out.logits]
        step_mask, step_positions = mask, positions[:, -1:]
        for step in range(steps):
            token = logits[-1][:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([step_mask, torch.ones_like(token)], dim=1)
            step_positions = step_positions + 1
            out = run(input_ids=token, attention_mask=step_mask, position_ids=step_positions, cache=cache,
                      use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits.append(out.logits)
        results.append((logits, [kept.clone() for layer in cache.layers for kept in (layer.keys, layer.values)]))
    return results


def _its_numbers_bitwise(model, ids, mask, positions):
    """The sampler's forward of ``model`` exists and gives its logits and cache bitwise."""
    forward = sampling_forward(model)
    assert forward is not None
    (ours, our_cache), (theirs, their_cache) = _both_ways(forward, model, ids, mask, positions)
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert torch.equal(got, expected)


@needs_onednn
@pytest.mark.parametrize("kind, extra", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", {}),
    # an intermediate size off the activation kernels' vector width, and another activation: the
    # fused gate is a strided slice, which the activation must not read as one
    ("llama", {"intermediate_size": 1000}), ("qwen3", {"intermediate_size": 1000, "hidden_act": "gelu"}),
])
def test_fused_forward_gives_the_models_logits_and_cache_bitwise(kind, extra, monkeypatch):
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    policy = _policy(kind, **extra)
    ids, mask, positions = _prompts()
    with torch.no_grad(), merged_lora_weights(policy) as merged, inference_linears(merged):
        forward = sampling_forward(merged, fuse=True)
        assert isinstance(forward, SamplingForward)
        assert all(layer.qkv is not None and layer.gate_up is not None and layer.o_packed is not None
                   and layer.down_packed is not None for layer in forward.layers)
        # q and k rotated together where there are no per-head norms between product and rotation
        assert all(layer.rotate_together == (kind != "qwen3") for layer in forward.layers)
        (ours, our_cache), (theirs, their_cache) = _both_ways(forward, merged, ids, mask, positions)
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert torch.equal(got, expected)


def test_a_decode_step_without_gradients_runs_in_inference_mode_and_a_prefill_does_not():
    """A decode step without gradients runs in torch.inference_mode (the same kernels, so the same
    numbers: the tests here compare them under no_grad), so its logits are inference tensors; a
    prefill keeps no_grad (the prompt's products it hands the update must be ordinary tensors), as
    does a step with gradients on. The in-place cache's buffers stay ordinary tensors either way."""
    model = _model("llama")
    ids, mask, positions = _prompts()
    forward = sampling_forward(model)
    assert isinstance(forward, SamplingForward)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

    def decode(cache):
        return forward(input_ids=ids[:, -1:], attention_mask=step_mask, position_ids=positions[:, -1:] + 1,
                       cache=cache, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        prefill = forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = preallocated(prefill.cache, 1)
        step = decode(cache)
        expected = model(input_ids=ids[:, -1:], attention_mask=step_mask, position_ids=positions[:, -1:] + 1,
                         cache=preallocated(model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                  use_cache=True).cache, 1), use_cache=True, logits_to_keep=1)
    assert not prefill.logits.is_inference() and step.logits.is_inference()
    assert torch.equal(step.logits, expected.logits)
    assert not any(layer._key_buffer.is_inference() or layer._value_buffer.is_inference() for layer in cache.layers)
    with torch.enable_grad():
        assert not decode(preallocated(forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                                               use_cache=True).cache, 1)).logits.is_inference()


def test_a_one_column_prompt_prefix_whose_products_the_update_takes_keeps_no_grad():
    """Prompts of two tokens share a one-column prefill: one column like a decode step, but its
    products are kept whole for the update, whose backward may save them, so they must be ordinary
    tensors."""
    from rlhf.models import fuse_lora_layers
    from rlhf.sampled_products import SampledProducts, replayable_modules

    policy = _policy("llama")
    assert fuse_lora_layers(policy) > 0  # the layers whose products can be kept
    ids = torch.tensor([[5, 6], [5, 6], [7, 8]])  # a group of two rows and one more prompt
    mask = torch.ones_like(ids)
    products = SampledProducts(replayable_modules(policy), 3, 2, torch.device("cpu"))
    with torch.no_grad(), merged_lora_weights(policy) as merged:
        forward = sampling_forward(merged)
        forward.recorder = products
        with products.writing_prefix(0, ids[:, :1], mask[:, :1]):  # the prefill runs the distinct prompts
            out = forward(input_ids=ids[1:, :1], attention_mask=mask[1:, :1], position_ids=torch.zeros_like(ids[1:, :1]),
                          use_cache=True)
    (prefix,) = products.prefixes
    assert prefix.outputs and not any(kept.is_inference() for kept in prefix.outputs.values())
    assert not out.logits.is_inference()


def test_a_dynamic_rotary_embedding_keeps_ordinary_buffers_through_inference_mode_decode_steps():
    """A "dynamic" rotary embedding re-registers its frequencies once the sequence passes
    max_position_embeddings; inside a decode step (inference mode) they would be inference tensors
    left on the model, which nothing may write in place afterwards."""
    model = _model("llama", max_position_embeddings=12,
                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ids, mask, positions = _prompts()
    forward = sampling_forward(model)
    with torch.no_grad():
        (ours, our_cache), _ = _both_ways(forward, forward, ids, mask, positions, steps=6)  # 9 columns + 6 > 12
    # the model's own forward (no inference mode) would register them afresh: checked before it runs
    assert model.model.rotary_emb.max_seq_len_cached > 12
    assert not any(buffer.is_inference() for buffer in model.buffers())
    model.model.rotary_emb.inv_freq.mul_(1.0)  # in place, outside inference mode
    with torch.no_grad():
        _, (theirs, their_cache) = _both_ways(forward, model, ids, mask, positions, steps=6)
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_bfloat16_model_rotates_q_and_k_together_and_gives_its_logits_and_cache_bitwise(kind, monkeypatch):
    """A bfloat16 model without LoRA (packed where inference_linears packs bfloat16): q and k
    rotated as one bfloat16 view of the fused product, o and down through the packed weights."""
    if not cpu_linear.bf16_packing_exact():
        pytest.skip("bfloat16 products through packed weights are not exact here")
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: cpu_linear.onednn_usable())
    model = _model(kind).to(torch.bfloat16)
    ids, mask, positions = _prompts()
    with torch.no_grad(), inference_linears(model):
        forward = sampling_forward(model, fuse=True)
        assert all(layer.rotate_together and layer.o_packed is not None for layer in forward.layers)
        (ours, our_cache), (theirs, their_cache) = _both_ways(forward, model, ids, mask, positions)
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert got.dtype == expected.dtype == torch.bfloat16 and torch.equal(got, expected)


@needs_onednn
def test_a_rotary_embedding_other_than_llamas_keeps_the_models_own_call(monkeypatch):
    """q and k are rotated together only where the model's apply_rotary_pos_emb gives that
    formula's numbers: a partial rotation (half of each head, as Phi's) keeps the model's call."""
    from transformers.models.llama import modeling_llama

    llama_rotary = modeling_llama.apply_rotary_pos_emb

    def partial_rotary(q, k, cos, sin, unsqueeze_dim=1):
        half = q.shape[-1] // 2
        rotated = llama_rotary(q[..., :half], k[..., :half], cos[..., :half], sin[..., :half], unsqueeze_dim)
        return torch.cat([rotated[0], q[..., half:]], -1), torch.cat([rotated[1], k[..., half:]], -1)

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", partial_rotary)
    policy = _policy("llama")
    ids, mask, positions = _prompts()
    with torch.no_grad(), merged_lora_weights(policy) as merged, inference_linears(merged):
        forward = sampling_forward(merged, fuse=True)
        assert all(layer.qkv is not None and not layer.rotate_together for layer in forward.layers)
        (ours, our_cache), (theirs, their_cache) = _both_ways(forward, merged, ids, mask, positions)
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("route", [True, False])
def test_unfused_forward_gives_the_models_logits_bitwise_on_either_backend(route, monkeypatch):
    """Small projections (not sent to oneDNN) and BLAS machines: each projection runs as its own
    layer; a single row keeps the separate products too."""
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: route)
    policy = _policy("llama", hidden=32 if route else 512)
    for rows in (1, 6):
        ids, mask, positions = _prompts(rows=rows)
        if rows == 1:
            mask = torch.ones_like(ids)
        with torch.no_grad(), merged_lora_weights(policy) as merged, inference_linears(merged):
            forward = sampling_forward(merged, fuse=True)
            assert all(layer.qkv is None for layer in forward.layers)
            (ours, _), (theirs, _) = _both_ways(forward, merged, ids, mask, positions)
        for got, expected in zip(ours, theirs):
            assert torch.equal(got, expected)


def test_sampler_draws_the_same_tokens_and_logprobs_through_it(monkeypatch):
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: cpu_linear.onednn_usable())
    policy = _policy("qwen2")
    ids, mask, _ = _prompts(rows=2)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # groups sharing a prompt
    draws = []
    with merged_lora_weights(policy) as merged, inference_linears(merged):
        for fast in (sampling_forward(merged, fuse=True), None):
            torch.manual_seed(5)
            draws.append(sample_responses(merged, ids, mask, max_new_tokens=12, temperature=0.9, top_p=0.95,
                                          eos_token_ids=[299], pad_token_id=0, share_prompt_prefix=True,
                                          fast_forward=fast))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


@needs_onednn
def test_layers_inference_linears_leaves_alone_are_not_fused_and_grad_mode_keeps_the_models_numbers(monkeypatch):
    from torch.nn.utils import parametrize

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    model = _model("llama")
    parametrize.register_parametrization(model.model.layers[0].self_attn.q_proj, "weight", nn.Identity())
    ids, mask, positions = _prompts()
    with inference_linears(model):
        forward = sampling_forward(model, fuse=True)
        assert forward.layers[0].qkv is None and forward.layers[1].qkv is not None
        with torch.no_grad():
            (ours, _), (theirs, _) = _both_ways(forward, model, ids, mask, positions, steps=1)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        # with gradients on, inference_linears leaves every layer to PyTorch's product: so does this
        got = forward(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert torch.equal(got, model(input_ids=ids, attention_mask=mask, position_ids=positions).logits)


def test_calls_without_positions_or_with_a_tensor_of_kept_logits_match_the_model():
    model = _model("llama", hidden=64)
    ids, _, _ = _prompts()
    with torch.no_grad():
        ours = sampling_forward(model)(input_ids=ids, logits_to_keep=torch.tensor([0, 4]))
        theirs = model(input_ids=ids, logits_to_keep=torch.tensor([0, 4]))
    assert torch.equal(ours.logits, theirs.logits)


def test_patched_or_compiled_modules_keep_the_models_forward(monkeypatch):
    instance = _model("llama", hidden=64)
    instance.model.layers[0].self_attn.forward = lambda *args, **kwargs: None
    assert sampling_forward(instance) is None
    import transformers.models.llama.modeling_llama as modeling

    patched = _model("llama", hidden=64)
    monkeypatch.setattr(modeling.LlamaMLP, "forward", lambda self, x: self.down_proj(x))  # as Liger patches a class
    assert sampling_forward(patched) is None
    monkeypatch.undo()
    compiled = _model("llama", hidden=64)
    compiled.compile()
    assert sampling_forward(compiled) is None


def test_models_it_is_not_exact_for_keep_their_own_forward():
    assert sampling_forward(_policy("llama").train()) is None  # dropout would apply
    from peft import LoraConfig, get_peft_model

    dora = LoraConfig(r=4, target_modules=TARGETS, use_dora=True)  # another kind of adapter
    assert sampling_forward(get_peft_model(_model("llama", hidden=64), dora).eval()) is None
    dropout = get_peft_model(_model("llama", hidden=64), LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1))
    dropout.eval().base_model.model.model.layers[1].mlp.up_proj.lora_dropout.train()  # it would drop
    assert sampling_forward(dropout) is None
    two = get_peft_model(_model("llama", hidden=64), LoraConfig(r=4, target_modules=TARGETS))
    two.add_adapter("other", LoraConfig(r=4, target_modules=TARGETS))
    two.base_model.set_adapter(["default", "other"])  # two adapters active at once
    assert sampling_forward(two.eval()) is None
    peft_merged = _policy("llama", hidden=64)
    peft_merged.merge_adapter()  # peft's own merge: the base layers alone
    assert sampling_forward(peft_merged) is not None
    with peft_merged.disable_adapter():  # merged and switched off: peft unmerges in its forward
        assert sampling_forward(peft_merged) is None
    chunked = _model("llama")
    chunked.config.layer_types = ["full_attention", "chunked_attention"]
    assert sampling_forward(chunked) is None
    windowless = _model("mistral")
    windowless.config.sliding_window = 0
    assert sampling_forward(windowless) is None
    hooked = _model("llama")
    hooked.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert sampling_forward(hooked) is None
    flex = _model("llama")
    flex.config._attn_implementation = "flex_attention"
    assert sampling_forward(flex) is None

    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert sampling_forward(gpt2) is None
    subclass = type("MyLlama", (transformers.LlamaForCausalLM,), {})(_model("llama").config).eval()
    assert sampling_forward(subclass) is None  # a subclass may change the forward
    remote = type("LlamaForCausalLM", (transformers.LlamaForCausalLM,), {"__module__": "transformers_modules.user.model"})
    assert sampling_forward(remote(_model("llama").config).eval()) is None  # remote code under the same name


def test_a_forward_that_captured_hidden_states_leaves_it_on_and_exact():
    """transformers installs output-capturing hooks on the layers the first time a forward asks for
    hidden states (a value head's forward): they record nothing outside such a forward, so the
    sampler's forward stays on for later rollouts and gives the model's logits."""
    policy = _policy("llama", hidden=64)
    ids, mask, positions = _prompts()
    with torch.no_grad():
        hidden = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and any(layer._forward_hooks for layer in policy.modules())
    with torch.no_grad():
        _its_numbers_bitwise(policy, ids, mask, positions)
        # and the hooks still record when a forward asks for hidden states again
        again = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert all(torch.equal(a, b) for a, b in zip(hidden, again))
    policy.base_model.model.model.layers[0].register_forward_hook(lambda *args: None)  # a hook of the user's own
    assert sampling_forward(policy) is None


def test_gradient_checkpointings_input_grad_hook_leaves_it_on_and_exact():
    """Gradient checkpointing with frozen embeddings installs transformers' hook that marks the
    embeddings' output as requiring grad (enable_input_require_grads, as peft and the trainer
    call it, here twice): under sampling's no_grad it records nothing, so the sampler's forward
    stays on and gives the model's logits and cache (it was off for every such run)."""
    policy = _policy("llama", hidden=64)
    policy.enable_input_require_grads()
    policy.enable_input_require_grads()
    assert policy.get_input_embeddings()._forward_hooks
    with torch.no_grad():
        _its_numbers_bitwise(policy, *_prompts())
    policy.get_input_embeddings().register_forward_hook(lambda *args: None)  # a hook of the user's own
    assert sampling_forward(policy) is None


def test_eager_attention_gives_the_models_logits():
    model = _model("llama", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ids, mask, positions = _prompts()
    with torch.no_grad():
        (ours, _), (theirs, _) = _both_ways(sampling_forward(model), model, ids, mask, positions, steps=2)
    for got, expected in zip(ours, theirs):
        assert torch.equal(got, expected)


def test_packed_copies_are_skipped_without_memory_for_them(monkeypatch):
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    monkeypatch.setattr("rlhf.sampling_forward.available_memory_bytes", lambda: 1000)
    forward = sampling_forward(_model("llama"), fuse=True)
    assert forward is not None and all(layer.qkv is None and layer.gate_up is None for layer in forward.layers)
    assert all(layer.qkv is None for layer in sampling_forward(_model("llama")).layers)  # not asked to fuse


def test_outside_inference_linears_it_gives_the_models_logits_bitwise():
    model = _model("llama")
    ids, mask, positions = _prompts()
    with torch.no_grad():
        (ours, _), (theirs, _) = _both_ways(sampling_forward(model), model, ids, mask, positions, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("kind, window", [("mistral", None), ("mistral", 4096), ("mistral", 12), ("qwen2", 12)])
def test_sliding_window_layers_take_it_within_the_window_and_the_models_forward_from_its_edge(kind, window, padded,
                                                                                             monkeypatch):
    """Mistral's default config slides over 4096 tokens; within the window a sliding layer sees every
    earlier column, as full attention does. The prompts take 9 columns, so a window of 12 is reached
    on the third decode step: from there the model's own mask and cache decide (full attention past
    it would attend to columns the model no longer sees; at the edge itself the model's mask is
    always built, where the causal one is None for an unpadded batch, and SDPA takes another kernel)."""
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    extra = {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 1} if kind == "qwen2" else {}
    model = _model(kind, **extra)
    if kind == "mistral":
        model.config.sliding_window = window
    ids, mask, positions = _prompts()
    if not padded:
        mask, positions = torch.ones_like(mask), torch.arange(ids.shape[1]).expand_as(ids)
    calls = []
    own_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, **kwargs: calls.append(1) or own_forward(self, **kwargs))
    with torch.no_grad(), inference_linears(model):
        forward = sampling_forward(model, fuse=True)
        assert isinstance(forward, SamplingForward) and forward.window == window
        (ours, our_cache), (theirs, their_cache) = _both_ways(forward, model, ids, mask, positions, steps=6)
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert torch.equal(got, expected)
    model_calls = 1 + 6  # the model's own run in _both_ways
    # ours: none below the window; from 12 columns on (decode steps 3-6) the model's forward
    assert len(calls) - model_calls == (4 if window == 12 else 0)
    # the fused packed copies go once the model's forward (which packs each layer's own) takes over
    assert all((layer.qkv is None) == (window == 12) for layer in forward.layers)


@pytest.mark.parametrize("window, converted", [(4096, True), (40, True), (20, False)])
def test_sliding_layers_below_their_window_take_the_in_place_cache_with_the_same_samples(window, converted,
                                                                                       monkeypatch):
    """9 prompt columns + 8 new tokens stay below a window of 40 (and 4096): the sliding layers hold
    every column, so the sampler writes them in place like plain layers (same tokens and logprobs
    as with transformers' sliding layers); a window of 20 could be reached by a longer run of the
    same rows (9 + 16 >= 20) and keeps them as they are."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from rlhf import kv_cache, rollout
    from rlhf.kv_cache import PreallocatedLayer

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    model = _model("mistral")
    model.config.sliding_window = window
    ids, mask, _ = _prompts()
    kinds = []
    convert = kv_cache.preallocated

    def recorded(cache, more_tokens, bounded=False):
        cache = convert(cache, more_tokens, bounded=bounded and use_bound)
        kinds.append({type(layer) for layer in cache.layers})
        return cache
    monkeypatch.setattr(rollout, "preallocated", recorded)
    results = []
    with torch.no_grad(), inference_linears(model):
        forward = sampling_forward(model, fuse=True)
        for use_bound in (True, False):
            for fast in (forward, None):
                torch.manual_seed(3)
                results.append(rollout.sample_responses(
                    model, ids, mask, max_new_tokens=16 if window == 20 else 8, temperature=1.0, top_p=1.0,
                    eos_token_ids=[0], pad_token_id=0, share_prompt_prefix=True, fast_forward=fast))
    assert kinds[0] == ({PreallocatedLayer} if converted else {DynamicSlidingWindowLayer})
    assert kinds[-1] == {DynamicSlidingWindowLayer}  # without the bound: as transformers keeps them
    for tokens, logprobs in results[1:]:
        assert torch.equal(tokens, results[0][0]) and torch.equal(logprobs, results[0][1])


def _lora_cases():
    bf16_fused = cpu_linear.bf16_packing_exact()
    return [  # (dtype, peft's forward or rlhf's fused LoRA function, fused q/k/v and gate/up expected)
        pytest.param(torch.float32, False, cpu_linear.onednn_packing_usable(), id="float32"),
        pytest.param(torch.float32, True, False, id="float32-fused-lora-function"),
        pytest.param(torch.bfloat16, False, bf16_fused, id="bfloat16"),
    ]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype, lora_function, fused", _lora_cases())
def test_unmerged_lora_gives_the_models_logits_and_cache_bitwise(kind, dtype, lora_function, fused, monkeypatch):
    """LoRA left unfolded (a bfloat16 base, or no memory for the folded copies): each adapter layer
    gives peft's (or rlhf's fused LoRA layer's) output, also where the base products are fused."""
    from rlhf.models import fuse_lora_layers

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: cpu_linear.onednn_usable())
    policy = add_lora(_model(kind).to(dtype), 4, 8, 0.0, TARGETS)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    policy.eval()
    if lora_function:
        assert fuse_lora_layers(policy) > 0
    ids, mask, positions = _prompts()
    with torch.no_grad(), inference_linears(policy):
        forward = sampling_forward(policy, fuse=True)
        assert isinstance(forward, SamplingForward)
        assert all((layer.qkv is not None and layer.gate_up is not None) == fused for layer in forward.layers)
        # o and down through the packed weights with their LoRA terms after; q/k/v's LoRA keeps
        # q and k apart for the model's rotary embedding
        assert all((layer.o_packed is not None and layer.down_packed is not None and layer.o_lora is not None)
                   == fused and not layer.rotate_together for layer in forward.layers)
        (ours, our_cache), (theirs, their_cache) = _both_ways(forward, policy, ids, mask, positions)
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert not torch.equal(ours[0], policy.get_base_model()(input_ids=ids, attention_mask=mask).logits)  # LoRA counted


def test_bfloat16_sampling_draws_the_same_tokens_with_packed_weights_and_its_forward(monkeypatch):
    """A bfloat16 policy sampled through inference_linears' packed weights (where exact) and the
    sampler's forward draws what the plain model draws, token for token and logprob for logprob."""
    from rlhf import models

    policy = add_lora(_model("qwen2").to(torch.bfloat16), 4, 8, 0.0, TARGETS).eval()
    ids, mask, _ = _prompts(rows=2)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    draws = []
    for speedups in (True, False):
        monkeypatch.setattr(models, "bf16_packing_exact", lambda real=cpu_linear.bf16_packing_exact: speedups and real())
        with torch.no_grad(), inference_linears(policy):
            packed = [m for m in policy.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16
                      and "forward" in vars(m)]
            assert bool(packed) == (speedups and cpu_linear.bf16_packing_exact())
            torch.manual_seed(5)
            draws.append(sample_responses(policy, ids, mask, max_new_tokens=12, temperature=0.9, top_p=0.95,
                                          eos_token_ids=[299], pad_token_id=0, share_prompt_prefix=True,
                                          fast_forward=sampling_forward(policy, fuse=True) if speedups else None))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def test_adapters_it_follows_beyond_the_trainers_own(monkeypatch):
    """A user's PeftModel: LoRA dropout (inert in eval mode), and an active adapter that leaves
    some layers alone (peft runs their base layer): logits and cache still the model's own."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: cpu_linear.onednn_usable())
    with_dropout = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1))
    partial = get_peft_model(_model("qwen2"), LoraConfig(r=4, target_modules=TARGETS))
    partial.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    partial.set_adapter("other")
    for policy in (with_dropout, partial):
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
        policy.eval()
        ids, mask, positions = _prompts()
        with torch.no_grad(), inference_linears(policy):
            forward = sampling_forward(policy, fuse=True)
            assert isinstance(forward, SamplingForward)
            (ours, our_cache), (theirs, their_cache) = _both_ways(forward, policy, ids, mask, positions)
        assert all(torch.equal(a, b) for a, b in zip(ours + our_cache, theirs + their_cache))


@pytest.mark.skipif(not cpu_linear.bf16_packing_exact(), reason="bfloat16 weights are not packed on this machine")
def test_packed_bfloat16_layers_give_the_plain_layers_output_for_strided_inputs_too():
    """Phi's LM head has a bias and reads the last position of each row, a strided view: F.linear
    computes that through another kernel, which the packed product must not replace."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 512).to(torch.bfloat16)
    hidden = torch.randn(6, 9, 256).to(torch.bfloat16)
    inputs = [hidden, hidden[:, -1:], hidden[:, -3:], hidden.transpose(0, 1), hidden[:, :, :]]
    with torch.no_grad():
        expected = [layer(x) for x in inputs]
        with inference_linears(layer):
            assert "forward" in vars(layer)
            got = [layer(x) for x in inputs]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def _lora_state(policy):
    """What sampling must leave as it found it: each base weight (the tensor itself, its storage
    and version), each parameter's requires_grad, each LoRA layer's switches."""
    from peft.tuners.lora import LoraLayer

    weights = [(module.get_base_layer(), module.get_base_layer().weight) for module in policy.modules()
               if isinstance(module, LoraLayer)]
    return ([(base, weight, weight.data_ptr(), weight._version) for base, weight in weights],
            [parameter.requires_grad for parameter in policy.parameters()],
            [(module.disable_adapters, module.merged) for module in policy.modules() if isinstance(module, LoraLayer)])


def _unchanged(policy, state) -> bool:
    now = _lora_state(policy)
    return (all(base.weight is weight and weight.data_ptr() == pointer and weight._version == version
                for base, weight, pointer, version in state[0]) and now[1:] == state[1:])


@needs_onednn
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_folding_forward_gives_the_folded_models_logits_and_cache_bitwise_and_leaves_the_model_alone(kind, monkeypatch):
    """sampling_forward(fold=True) folds each LoRA into its own packed weights (W + s*B@A, one
    layer at a time): 2+ rows give bitwise the logits and cache of the model with its LoRA folded
    in by merged_lora_weights, while the model itself keeps its weights and adapters as they are;
    a single row takes the folded weights too (another kernel: the model's numbers up to rounding)."""
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    policy = _policy(kind)
    ids, mask, positions = _prompts()
    state = _lora_state(policy)
    with torch.no_grad(), inference_linears(policy):
        forward = sampling_forward(policy, fuse=True, fold=True, columns=64)
        assert isinstance(forward, SamplingForward) and forward.folded
        assert all(layer.qkv is not None and layer.gate_up is not None and layer.o_packed is not None
                   and layer.down_packed is not None and layer.qkv_lora == [None] * 3 for layer in forward.layers)
        assert _unchanged(policy, state)  # no folded copy in the model: its weights and switches as they were
        (ours, our_cache), _ = _both_ways(forward, policy, ids, mask, positions)
        token = dict(input_ids=ids[1:2, :1], attention_mask=mask[1:2, :1], position_ids=positions[1:2, :1])
        one_row, unfolded = forward(**token).logits, policy(**token).logits
    assert _unchanged(policy, state)
    with torch.no_grad(), merged_lora_weights(policy) as merged, inference_linears(merged):
        (theirs, their_cache), _ = _both_ways(merged, merged, ids, mask, positions)
        one_row_merged = merged(**token).logits
    for got, expected in zip(ours + our_cache, theirs + their_cache):
        assert torch.equal(got, expected)
    # one row: the model's numbers with its LoRA, unfolded or folded, up to float rounding (not the base's)
    assert torch.allclose(one_row, unfolded, atol=1e-4) and torch.allclose(one_row, one_row_merged, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(one_row, _model(kind)(**token).logits, atol=1e-3)


@needs_onednn
def test_sampling_speedups_fold_into_the_samplers_weights_and_draw_what_the_folded_model_draws(monkeypatch):
    """Where the sampler's forward runs every step, sampling_speedups leaves the policy as it is
    (no folded copies of its weights, adapters on) and folds the LoRA into the sampler's packed
    weights: the same tokens and logprobs as sampling the model folded by merged_lora_weights
    (every step 2+ rows), and the policy's weights, switches and requires_grad untouched after."""
    from rlhf.rollout import sampling_speedups

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    policy = _policy("qwen2")
    for name, parameter in policy.named_parameters():  # a frozen adapter weight stays frozen
        parameter.requires_grad = "lora_A" in name and "layers.0." in name
    ids, mask, _ = _prompts(rows=2)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    state = _lora_state(policy)
    draws = []
    with sampling_speedups(policy, columns=ids.shape[1] + 12) as (sampler, fast):
        assert sampler is policy and fast is not None and fast.folded and _unchanged(policy, state)
        torch.manual_seed(5)
        draws.append(sample_responses(sampler, ids, mask, max_new_tokens=12, temperature=0.9, top_p=0.95,
                                      eos_token_ids=[], pad_token_id=0, share_prompt_prefix=True, fast_forward=fast))
    assert _unchanged(policy, state)
    with merged_lora_weights(policy) as merged, inference_linears(merged):
        torch.manual_seed(5)
        draws.append(sample_responses(merged, ids, mask, max_new_tokens=12, temperature=0.9, top_p=0.95,
                                      eos_token_ids=[], pad_token_id=0, share_prompt_prefix=True,
                                      fast_forward=sampling_forward(merged, fuse=True)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


@needs_onednn
@pytest.mark.parametrize("case", ["window_unknown", "window_reached", "dora", "small_layers", "not_onednn"])
def test_sampling_speedups_fold_into_the_model_where_the_sampler_cannot_hold_the_lora(case, monkeypatch):
    """The LoRA is folded into the model's weights as before (merged_lora_weights) where the
    sampler's own packed weights cannot carry it: a sliding window the sequences may reach (the
    model's own forward would then run the LoRA unfolded), an adapter that does not fold, layers
    too small for oneDNN, a machine whose products are not oneDNN's."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from rlhf.rollout import sampling_speedups

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: case != "not_onednn")
    columns = 64
    if case == "dora":
        policy = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            use_dora=True)).eval()
    else:
        window = {"window_unknown": 4096, "window_reached": 40}.get(case)
        policy = _policy("mistral", sliding_window=window) if window else _policy("llama", hidden=64)
        policy.get_base_model().config.sliding_window = window
        columns = None if case == "window_unknown" else columns
    with sampling_speedups(policy, columns=columns) as (sampler, fast):
        assert fast is None or not fast.folded
        # merged_lora_weights folds into the model's weights and switches its LoRA layers off (DoRA: neither)
        switched_off = [module.disable_adapters for module in policy.modules() if isinstance(module, LoraLayer)]
        assert all(switched_off) == (case != "dora") and any(switched_off) == (case != "dora")
