"""Issue 16: the multi-process and edge-case bugs of the RL-math review, each pinned by a test that
failed before its fix. The one-update equivalence over every shipped config is in test_distributed.py."""

from __future__ import annotations

import copy
import json
import threading
import warnings

import pytest
import torch

from conftest import FIXTURES
from fixtures.rollouts import end_rows_early, with_response_width
from rlhf import algorithms as A
from rlhf.cli import ALGORITHM_DEFAULTS
from rlhf.config import RLConfig

REWARD = f"{FIXTURES / 'rewards.py'}:char_diversity"


def as_processes(fn, shards):
    """Run fn(shard, all_reduce) for every shard at once, one thread per "process"; all_reduce sums a
    tensor over all of them, like torch.distributed's. Returns the results in shard order."""
    barrier, slots, results = threading.Barrier(len(shards)), [None] * len(shards), [None] * len(shards)

    def run(rank):
        def all_reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # nobody overwrites a slot before everyone has read them all
            return total

        results[rank] = fn(shards[rank], all_reduce)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# ---------------------------------------------------------------------------- 1. REINFORCE++


def test_reinforce_pp_whitens_over_the_global_batch():
    torch.manual_seed(0)
    mask = (torch.arange(6) < torch.tensor([6, 3, 5, 2, 6, 4, 1, 5]).unsqueeze(1)).float()
    rewards = torch.randn(8, 6) * mask
    rewards[4:] += 3.0 * mask[4:]  # the second half (process 1's share) scores 3 higher
    whole, _ = A.reinforce_pp_advantages(rewards, mask)
    halves = [(rewards[:4], mask[:4]), (rewards[4:], mask[4:])]
    per_process = torch.cat([A.reinforce_pp_advantages(r, m)[0] for r, m in halves])
    assert (per_process - whole).abs().max() > 0.5  # what each process alone would compute (the old bug)
    global_parts = as_processes(lambda shard, reduce: A.reinforce_pp_advantages(*shard, all_reduce=reduce)[0], halves)
    assert torch.allclose(torch.cat(global_parts), whole, atol=1e-6)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (100.0, 0.01)])
def test_global_whitening_matches_whitening_the_concatenated_batch(mean, std):
    torch.manual_seed(1)
    x, mask = torch.randn(6, 5) * std + mean, (torch.rand(6, 5) > 0.3).float()
    parts = torch.cat(as_processes(lambda shard, reduce: A.masked_whiten(*shard, all_reduce=reduce),
                                   [(x[:2], mask[:2]), (x[2:], mask[2:])]))
    assert torch.allclose(parts, A.masked_whiten(x, mask), atol=1e-4)
    assert float(parts[mask.bool()].std()) == pytest.approx(1.0, abs=1e-3)  # no one-pass E[x^2] - E[x]^2 rounding


# ---------------------------------------------------------------------------- 2. Dr. GRPO's constant


def test_seq_mean_token_sum_norm_divides_by_the_constant_not_the_padded_width():
    torch.manual_seed(0)
    loss, mask = torch.randn(4, 6), (torch.arange(6) < torch.tensor([6, 2, 4, 1]).unsqueeze(1)).float()
    wide_loss = torch.nn.functional.pad(loss, (0, 10), value=7.0)  # same data padded from width 6 to 16
    wide_mask = torch.nn.functional.pad(mask, (0, 10))
    narrow = A.agg_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=32)
    assert A.agg_loss(wide_loss, wide_mask, "seq-mean-token-sum-norm", norm_length=32) == pytest.approx(float(narrow))
    assert float(narrow) == pytest.approx(float((loss * mask).sum()) / (4 * 32))
    for name, fn in A.POLICY_LOSSES.items():  # every registered loss hands the constant on
        args = (loss, loss.detach() - 0.1, torch.ones(4, 6), mask)
        wide_args = tuple(torch.nn.functional.pad(t, (0, 10)) for t in args[:3]) + (wide_mask,)
        a = fn(*args, loss_agg_mode="seq-mean-token-sum-norm", norm_length=32)[0]
        b = fn(*wide_args, loss_agg_mode="seq-mean-token-sum-norm", norm_length=32)[0]
        assert float(a) == pytest.approx(float(b), abs=1e-7), name


# ---------------------------------------------------------------------------- 8. filtered rows


@pytest.mark.parametrize("mode", A.LOSS_AGG_MODES)
def test_dropped_rows_count_in_no_normaliser(mode):
    """filter_zero_std_groups zeroes the mask of dropped rows: every mode must then give the loss of
    the kept rows alone (token-mean always did; the seq-* modes counted the dropped rows)."""
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.arange(5) < torch.tensor([5, 3, 4, 2, 5, 1]).unsqueeze(1)).float()
    kept = torch.tensor([True, False, True, True, False, True])
    filtered = mask * kept.unsqueeze(1)
    got = A.agg_loss(loss, filtered, mode, norm_length=5)
    assert float(got) == pytest.approx(float(A.agg_loss(loss[kept], mask[kept], mode, norm_length=5)), abs=1e-6)
    assert float(A.agg_units(filtered, mode)) == float(A.agg_units(mask[kept], mode))


# ---------------------------------------------------------------------------- 6. sampler


def test_inverse_cdf_never_draws_a_zero_probability_token():
    from rlhf.rollout import inverse_cdf_sample

    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1e-30, 0.0], [0.25, 0.25, 0.5, 0.0]])
    assert inverse_cdf_sample(probs, torch.zeros(3)).tolist() == [1, 2, 0]  # u = 0: the old left side gave 0, 0, 0
    almost_one = torch.full((3,), 1.0 - 2**-24)
    assert inverse_cdf_sample(probs, almost_one).tolist() == [2, 2, 2]  # never the zero-mass tail
    u = torch.rand(20000)
    draws = inverse_cdf_sample(probs[2:].expand(20000, 4), u)
    frequencies = torch.bincount(draws, minlength=4).float() / 20000
    assert torch.allclose(frequencies, probs[2], atol=0.02)


# ---------------------------------------------------------------------------- 5. double backward


def test_fused_lora_layers_give_peft_hessian_vector_products(tiny_model_dir):
    """TRPO's Fisher-vector products differentiate the gradient again; away from the old weights
    (where the KL gradient is not 0) the fused layers must give peft's second derivatives."""
    from rlhf.models import fuse_lora_layers
    from test_speedups import _trained_lora

    input_ids = torch.randint(0, 1000, (2, 7))

    def hessian_vector_product(model):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        params = [p for p in model.parameters() if p.requires_grad]
        with sdpa_kernel(SDPBackend.MATH):  # as in TRPO: the fused attention kernels have no double backward
            log_probs = model(input_ids=input_ids).logits.log_softmax(-1)
        loss = (log_probs[..., :50] * torch.linspace(-1, 1, 50)).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vector = [torch.ones_like(p) * 0.01 for p in params]
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(
            sum((g * v).sum() for g, v in zip(grads, vector)), params)])

    expected = hessian_vector_product(_trained_lora(tiny_model_dir))
    fused = _trained_lora(tiny_model_dir)
    assert fuse_lora_layers(fused) > 0
    got = hessian_vector_product(fused)
    assert expected.abs().max() > 1e-3
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-3), float((got - expected).abs().max())


# ---------------------------------------------------------------------------- 4. tied weights


def test_merged_sampling_never_writes_into_a_weight_tied_to_another_module(tiny_model_dir):
    from rlhf.models import add_lora, load_base_model, merged_lora_weights

    torch.manual_seed(0)
    policy = add_lora(load_base_model(str(tiny_model_dir)), 4, 8, 0.0, ["q_proj", "lm_head"])
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.eval()
    embedding = policy.get_input_embeddings().weight
    assert embedding is policy.base_model.model.lm_head.get_base_layer().weight  # the tiny Llama ties them
    embedding_before = embedding.detach().clone()
    input_ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        unmerged = policy(input_ids=input_ids).logits
        with merged_lora_weights(policy) as merged_policy:
            merged = merged_policy(input_ids=input_ids).logits
            assert torch.equal(policy.get_input_embeddings().weight, embedding_before)
    assert torch.allclose(merged, unmerged, atol=1e-5), float((merged - unmerged).abs().max())
    assert policy.base_model.model.lm_head.get_base_layer().weight is embedding  # the tie is restored


# ---------------------------------------------------------------------------- trainer-level helpers


def make_trainer(tiny_model_dir, tmp_path, algorithm="grpo", **overrides):
    from rlhf.trainer import RLTrainer

    config = RLConfig(**{
        **ALGORITHM_DEFAULTS[algorithm], "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 4, "mini_batch_size": 8, "ppo_epochs": 2,
        "max_new_tokens": 8, "max_prompt_length": 48, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3,
        "kl_coef": 0.05, "save_steps": 0, "num_samples_to_log": 0, "reward_funcs": [REWARD], **overrides,
    })
    return RLTrainer(config)


def uneven_rollout(trainer):
    torch.manual_seed(1234)
    rollout = trainer._generate(trainer.dataset, [0, 1], trainer.config.num_generations)
    end_rows_early(rollout, trainer.tokenizer.eos_token_id, trainer.tokenizer.pad_token_id)
    return rollout


# ---------------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("update", [*A.POLICY_LOSSES, "trpo"])
def test_the_same_rollout_padded_to_two_widths_gives_the_same_update(tiny_model_dir, tmp_path, update):
    """Every loss_agg_mode and policy loss (and TRPO's surrogate): padding is no data."""
    overrides = ({"update_method": "trpo", "advantage_estimator": "grpo", "fisher_sample_fraction": 1.0}
                 if update == "trpo" else {"policy_loss": update})
    trainer = make_trainer(tiny_model_dir, tmp_path, **overrides)
    rollout = uneven_rollout(trainer)
    scores = torch.linspace(-1, 1, len(rollout))
    pad = trainer.tokenizer.pad_token_id
    trained = {n: p for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trained.items()}
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict()) if trainer.optimizer else None
    differences = {}
    for mode in A.LOSS_AGG_MODES:
        trainer.config.loss_agg_mode = mode
        results = []
        for width in (rollout.response_length, rollout.response_length + 9):
            with torch.no_grad():
                for name, param in trained.items():
                    param.copy_(start[name])
            if optimizer_state is not None:
                trainer.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
            torch.manual_seed(7)
            batch, _ = trainer.make_experience(with_response_width(rollout, width, pad), scores)
            trainer.update(batch)
            results.append({n: p.detach().clone() for n, p in trained.items()})
        moved = max(float((results[0][n] - start[n]).abs().max()) for n in start)
        assert moved > 1e-5, (mode, moved)
        differences[mode] = max(float((results[0][n] - results[1][n]).abs().max()) for n in start)
    assert all(d < 1e-6 for d in differences.values()), differences


# ---------------------------------------------------------------------------- 9. logged entropy


def test_entropy_on_the_skip_old_logprob_path_is_the_global_token_mean(tiny_model_dir, tmp_path):
    """One epoch, one minibatch, two micro-batches with different token counts: the logged entropy
    is the token mean of the whole rollout (it was the mean of the two micro-batch means)."""
    from rlhf.rollout import forward_response

    # A low temperature makes the per-token entropies of the random model differ widely.
    trainer = make_trainer(tiny_model_dir, tmp_path, ppo_epochs=1, kl_coef=0.0, gradient_accumulation_steps=2,
                           temperature=0.05)
    assert trainer.old_logprobs_from_update
    rollout = uneven_rollout(trainer)
    with torch.no_grad():
        _, _, entropy = forward_response(trainer.unwrapped, rollout, slice(None), 0.05, with_entropy=True)
    token_mean = float((entropy * rollout.mask).sum() / rollout.mask.sum())
    halves = [slice(0, 4), slice(4, 8)]
    mean_of_means = sum(float((entropy[h] * rollout.mask[h]).sum() / rollout.mask[h].sum()) for h in halves) / 2
    assert abs(token_mean - mean_of_means) > 1e-2  # the two answers differ here
    batch, metrics = trainer.make_experience(rollout, torch.linspace(-1, 1, len(rollout)))
    torch.manual_seed(0)
    logged = trainer.update(batch)["entropy"]
    assert logged == pytest.approx(token_mean, abs=1e-5)


# ---------------------------------------------------------------------------- 7. lora_dropout


def test_lora_dropout_is_refused_out_loud_and_not_recorded(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match="lora_dropout 0.05 is ignored"):
        trainer = make_trainer(tiny_model_dir, tmp_path, lora_dropout=0.05)
    final = trainer.save_final()
    assert json.loads((final / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tiny_model_dir, tmp_path / "no_dropout", lora_dropout=0.0)
    assert not [w for w in caught if "lora_dropout" in str(w.message)]


@pytest.mark.parametrize("model_type, dropout", [
    ("llama", {"attention_dropout": 0.1}), ("qwen2", {"attention_dropout": 0.1}),
    ("opt", {}),  # OPT's config defaults to dropout 0.1, as facebook/opt-* ship it
    ("gpt_neox", {"hidden_dropout": 0.1, "attention_dropout": 0.1}),
    ("phi3", {"attention_dropout": 0.1, "resid_pdrop": 0.1, "pad_token_id": 0}),
])
def test_a_loaded_model_has_no_dropout_left_in_training_mode(model_type, dropout, tmp_path):
    """Models copy dropout probabilities from their config onto modules when built and apply them
    in training mode (the update): two training-mode forwards of one input must agree."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf.models import add_lora, load_base_model

    config = AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=64, ffn_dim=64, word_embed_proj_dim=32,
                                  max_position_embeddings=64, **dropout)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    policy = add_lora(load_base_model(str(tmp_path / model_type)), 4, 8, 0.0, ["all-linear"]).train()
    input_ids = torch.arange(1, 21).view(2, 10)
    with torch.no_grad():
        first, second = policy(input_ids=input_ids).logits, policy(input_ids=input_ids).logits
    assert torch.equal(first, second)


def test_the_update_scores_the_network_that_sampled_with_training_mode_randomness_off(tmp_path):
    """PhiMoE draws its experts at random in training mode (sparsemixer), Mixtral jitters its
    router input when router_jitter_noise is set: the update runs those modules in eval mode, as
    the rollout ran them, so its forward is deterministic and equals the sampler's network."""
    from conftest import FIXTURES
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import update_mode

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    for model_type, extra in (("phimoe", {}), ("mixtral", {"router_jitter_noise": 0.3})):
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      num_local_experts=4, max_position_embeddings=128, **extra)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
        tokenizer.save_pretrained(tmp_path / model_type)
        # the default all-linear leaves PhiMoE's router alone, an nn.Linear whose forward returns a tuple
        trainer = make_trainer(tmp_path / model_type, tmp_path / f"run-{model_type}")
        modes = []
        for module in trainer.model.modules():
            if type(module).__name__.endswith("SparseMoeBlock"):
                module.register_forward_hook(lambda module, args, out: modes.append(module.training))
        rollout = trainer.rollout()
        batch, _ = trainer.make_experience(rollout, torch.linspace(-1, 1, len(rollout)))
        trainer.update(batch)
        assert modes and not any(modes), model_type
        assert any("lora_A" in name for name, _ in trainer.model.named_parameters() if ".experts." not in name)
        assert not any("router.lora" in name for name, _ in trainer.model.named_parameters())
        update_mode(trainer.model)
        policy = trainer.model.policy
        ids = torch.arange(1, 21).view(2, 10)
        first, second = policy(input_ids=ids).logits, policy(input_ids=ids).logits
        assert torch.equal(first, second), model_type
        with torch.no_grad():
            trainer.model.eval()
            assert torch.equal(policy(input_ids=ids).logits, first), model_type


def test_all_linear_probe_leaves_the_random_stream_and_training_mode_alone():
    """add_lora calls PhiMoE's router once to tell it from a linear layer: in training mode that
    router draws noise, which must neither move a seeded run's random stream nor change modes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf.models import _linear_subclasses_returning_more

    config = AutoConfig.for_model("phimoe", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).train()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert _linear_subclasses_returning_more(model) == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    assert torch.equal(torch.rand(3), expected) and all(module.training for module in model.modules())


# ---------------------------------------------------------------------------- 3. init_adapter artifacts


@pytest.fixture()
def init_adapter_dir(tiny_model_dir, tmp_path):
    """A trained-looking adapter on other modules and with another rank than the RL LoRA."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models import load_base_model

    torch.manual_seed(3)
    model = get_peft_model(load_base_model(str(tiny_model_dir)),
                           LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "init")
    return tmp_path / "init"


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("rl_targets", [["all-linear"], ["q_proj", "lm_head"]])
def test_a_run_from_an_init_adapter_saves_the_policy_it_trained(tiny_model_dir, tmp_path, init_adapter_dir, rl_targets):
    from peft import PeftModel

    from rlhf.models import load_base_model

    trainer = make_trainer(tiny_model_dir, tmp_path / "run", init_adapter=str(init_adapter_dir), save_steps=1,
                           lora_target_modules=rl_targets)
    trainer.train()
    input_ids = torch.randint(0, 1000, (2, 11))
    trained = _logits(trainer.unwrapped.policy, input_ids)
    with trainer.unwrapped.policy.disable_adapter():
        starting = _logits(trainer.unwrapped.policy, input_ids)
    for saved in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoints" / "step-1"):
        reloaded = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir)), str(saved)).eval()
        difference = float((_logits(reloaded, input_ids) - trained).abs().max())
        assert difference < 1e-5, (saved.name, difference)  # README's line gives the trained policy
        reference = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir)), str(saved / "init_adapter")).eval()
        assert torch.allclose(_logits(reference, input_ids), starting, atol=1e-5)  # and the KL reference
    raw = load_base_model(str(tiny_model_dir)).eval()
    assert float((_logits(raw, input_ids) - trained).abs().max()) > 1e-2  # the init adapter matters here


def test_resume_of_an_init_adapter_run_continues_the_rl_lora(tiny_model_dir, tmp_path, init_adapter_dir):
    first = make_trainer(tiny_model_dir, tmp_path / "run", init_adapter=str(init_adapter_dir), save_steps=1)
    first.train()
    weights = {n: p.detach().clone() for n, p in first.unwrapped.named_parameters() if p.requires_grad}
    resumed = make_trainer(tiny_model_dir, tmp_path / "run", init_adapter=str(init_adapter_dir),
                           resume_from_checkpoint="latest", max_steps=1)
    resumed._resume(tmp_path / "run" / "checkpoints" / "step-1")
    for name, param in resumed.unwrapped.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, weights[name]), name


def test_evaluate_measures_kl_against_the_init_adapter(tiny_model_dir, tmp_path, init_adapter_dir):
    """A run that has not moved from its init adapter has KL 0 to its starting policy, and the
    base row is that starting policy (it was the raw base: KL > 0)."""
    from rlhf.evaluate import evaluate

    trainer = make_trainer(tiny_model_dir, tmp_path / "run", init_adapter=str(init_adapter_dir))
    final = trainer.save_final()  # the RL LoRA is still zero: the saved policy is the init policy
    report = evaluate([str(final)], dataset="builtin:prompts", reward_funcs=[REWARD],
                      include_base=True, max_new_tokens=6, num_prompts=3, bootstrap_resamples=10,
                      max_prompt_length=48)
    rows = report["checkpoints"]
    assert rows[str(final)]["kl_per_sequence"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert rows["base"]["reward"]["mean"] == pytest.approx(rows[str(final)]["reward"]["mean"], abs=1e-6)
    assert report["settings"]["base_row"] == f"init adapter of {final}"

    # The base model named as a candidate is the base model, not the starting policy of the base row.
    mixed = evaluate([str(final), str(tiny_model_dir)], dataset="builtin:prompts", reward_funcs=[REWARD],
                     include_base=True, max_new_tokens=6, num_prompts=3, bootstrap_resamples=10, max_prompt_length=48)
    alone = evaluate([str(tiny_model_dir)], dataset="builtin:prompts", reward_funcs=[REWARD], max_new_tokens=6,
                     num_prompts=3, bootstrap_resamples=10, max_prompt_length=48)
    base_by_name = mixed["checkpoints"][str(tiny_model_dir)]
    assert base_by_name["reward"]["mean"] == pytest.approx(alone["checkpoints"][str(tiny_model_dir)]["reward"]["mean"])
    assert mixed["settings"]["kl_reference"] == {str(final): "init adapter", str(tiny_model_dir): "base model"}


def test_init_adapters_that_cannot_be_saved_with_the_rl_lora_are_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rlhf.errors import CheckpointError
    from rlhf.models import load_base_model

    dora = get_peft_model(load_base_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match="DoRA.*merge_and_unload"):
        make_trainer(tiny_model_dir, tmp_path / "run", init_adapter=str(tmp_path / "dora"))
    # On a tied model, merging an lm_head LoRA moves the input embedding too: no LoRA of lm_head holds that.
    tied = get_peft_model(load_base_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["lm_head"]))
    tied.save_pretrained(tmp_path / "tied", save_embedding_layers=False)
    with pytest.raises(CheckpointError, match="lm_head, whose weight is tied"):
        make_trainer(tiny_model_dir, tmp_path / "run2", init_adapter=str(tmp_path / "tied"))
