"""The gated-SiLU MLP's product through ``rlhf.models.swiglu``: autograd's numbers, one saved tensor fewer."""
import pytest
import torch
import transformers

from conftest import FIXTURES
from rlhf.cli import ALGORITHM_DEFAULTS
from rlhf.config import RLConfig
from rlhf.models import fuse_swiglu_mlps, swiglu
from rlhf.trainer import RLTrainer


def _saved_storages(compute):
    """(result of ``compute()``, the distinct storages autograd saved for its backward)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = compute()
    return result, storages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gives_autograds_numbers_and_keeps_gate_and_up_only(dtype):
    torch.manual_seed(0)
    gate, up, weight = (torch.randn(5, 3, 40, dtype=dtype) for _ in range(3))
    results = []
    for product in (lambda g, u: torch.nn.functional.silu(g) * u, swiglu):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out, saved = _saved_storages(lambda: product(g, u))
        (out * weight).sum().backward()
        results.append((out, g.grad, u.grad, len(saved)))
    (plain, plain_dgate, plain_dup, plain_saved), (fused, dgate, dup, fused_saved) = results
    assert torch.equal(plain, fused) and torch.equal(plain_dgate, dgate) and torch.equal(plain_dup, dup)
    assert (plain_saved, fused_saved) == (3, 2)  # gate, silu(gate), up -> gate, up


def test_swiglus_second_derivatives_agree_with_autograds():
    torch.manual_seed(1)
    gate, up, weight, direction = (torch.randn(6, 20, dtype=torch.float64) for _ in range(4))
    assert torch.autograd.gradgradcheck(swiglu, (gate.clone().requires_grad_(), up.clone().requires_grad_()))
    second = []
    for product in (lambda g, u: torch.nn.functional.silu(g) * u, swiglu):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        dgate, dup = torch.autograd.grad((product(g, u) * weight).sum(), (g, u), create_graph=True)
        second.append(torch.autograd.grad((dgate * direction).sum() + (dup * direction).sum(), (g, u)))
    for plain, fused in zip(*second):
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_without_gradients_swiglu_is_the_plain_product():
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(swiglu(gate, up), torch.nn.functional.silu(gate) * up)
    assert swiglu(gate, up).grad_fn is None


def _tiny(config_class, model_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, **extra)
    return model_class(config)


@pytest.mark.parametrize("classes", [
    (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    (transformers.MistralConfig, transformers.MistralForCausalLM),
    (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
])
def test_fused_mlps_give_the_models_logits_and_gradients_bitwise(classes):
    plain, fused = _tiny(*classes), _tiny(*classes)
    assert fuse_swiglu_mlps(fused) == 2
    ids = torch.randint(0, 64, (3, 7))
    grads = []
    for model in (plain, fused):
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        grads.append((logits, [p.grad for p in model.parameters()]))
    (plain_logits, plain_grads), (fused_logits, fused_grads) = grads
    assert torch.equal(plain_logits, fused_logits)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, fused_grads))


def test_mlps_with_another_activation_or_their_own_forward_are_left_alone():
    gelu = _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, hidden_act="gelu")
    assert fuse_swiglu_mlps(gelu) == 0
    patched = _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    first, second = (layer.mlp for layer in patched.model.layers)
    own = first.forward = lambda x: first.down_proj(first.up_proj(x))  # a user's (or Liger's) own forward
    assert fuse_swiglu_mlps(patched) == 1
    assert first.forward is own and getattr(second.forward, "stock_math", False)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    assert fuse_swiglu_mlps(gpt2) == 0


def test_the_sampling_forward_still_runs_models_with_fused_mlps():
    from rlhf.sampling_forward import sampling_forward

    model = _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM).eval()
    fuse_swiglu_mlps(model)
    assert sampling_forward(model) is not None
    model.model.layers[1].mlp.forward = lambda x: x  # an instance forward of another kind still turns it off
    assert sampling_forward(model) is None


def test_the_trainers_update_keeps_no_separate_activation_per_mlp(tiny_model_dir, tmp_path):
    """The policy the trainer builds runs its MLPs through ``swiglu``: its forward with gradients
    keeps gate and up but no silu(gate) tensor for the backward (before: one [tokens,
    intermediate] tensor more per layer)."""
    config = RLConfig(**{
        **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "max_new_tokens": 6,
        "max_prompt_length": 48, "lora_r": 4, "lora_alpha": 8, "save_steps": 0, "num_samples_to_log": 0,
        "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"]})
    trainer = RLTrainer(config)
    mlps = [module for module in trainer.model.modules() if type(module).__name__ == "LlamaMLP"]
    assert mlps and all(getattr(vars(mlp).get("forward"), "stock_math", False) for mlp in mlps)
    ids = torch.randint(0, 100, (2, 9))
    _, saved = _saved_storages(lambda: trainer.model.policy(input_ids=ids).logits)
    intermediate = trainer.model.policy.config.intermediate_size
    tokens = ids.numel()
    kept_intermediate = sum(1 for nbytes in saved.values() if nbytes == tokens * intermediate * 4)
    assert kept_intermediate == 3 * len(mlps)  # gate, up and down's input; the plain MLP kept silu(gate) too


def test_a_deep_copy_of_a_fused_model_runs_its_own_mlps():
    import copy

    model = _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    fuse_swiglu_mlps(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.zero_()
    ids = torch.randint(0, 64, (2, 5))
    assert not torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
    assert twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp


def test_an_activation_with_a_hook_is_still_called():
    plain, fused = (_tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM) for _ in range(2))
    fuse_swiglu_mlps(fused)
    seen = []
    for model in (plain, fused):
        model.model.layers[0].mlp.act_fn.register_forward_hook(lambda module, inputs, output: seen.append(output))
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # before: the fused MLP skipped the hook


def test_a_users_wrapper_around_a_fused_forward_turns_the_sampling_forward_off():
    import functools

    from rlhf.sampling_forward import sampling_forward

    model = _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM).eval()
    fuse_swiglu_mlps(model)
    mlp = model.model.layers[0].mlp
    fused_forward = mlp.forward

    @functools.wraps(fused_forward)  # copies the marker onto the wrapper
    def logged(x):
        return fused_forward(x)

    mlp.forward = logged
    assert sampling_forward(model) is None  # the sampler would skip the user's wrapper
