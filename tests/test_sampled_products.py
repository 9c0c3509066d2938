"""The sampler's products taken by the forward after it (rlhf.sampled_products): the same numbers
as the plain forward up to float rounding, and only where they are still that forward's."""

import pytest
import torch

PROMPTS = ["Hi", "Hi", "A much longer prompt with more tokens", "Hi", "A much longer prompt with more tokens",
           "Something else"]


def _policy(model_dir, chunked):
    from test_speedups import _trained_lora

    from rlhf.models import PolicyWithValue, fuse_lora_layers

    policy = _trained_lora(model_dir)
    assert fuse_lora_layers(policy) > 0
    return PolicyWithValue(policy, None, share_prompt_prefix=True, chunk_logits_bytes=0 if chunked else None)


def _sample(model, model_dir, stops=None, max_new_tokens=7, rotated_together=None, logits=False, attention=False,
            layer_buffers=False):
    """A grouped rollout sampled through the sampler's forward, its products kept (``rotated_together``:
    whether its layers must rotate q and k as one view of the fused q/k/v product; ``logits``: its
    logits too; ``attention``: its attention outputs too; ``layer_buffers``: each layer's products in
    one buffer, as the trainer keeps them)."""
    from rlhf.models import load_tokenizer
    from rlhf.rollout import generate_rollout, sampling_speedups
    from rlhf.sampled_products import SampledProducts, replayable_modules

    tokenizer = load_tokenizer(str(model_dir))
    vocabulary = model.chunked_vocabulary() if logits else 0
    assert vocabulary or not logits
    with sampling_speedups(model.policy) as (sampler, fast_forward):
        assert fast_forward is not None
        recorder = SampledProducts(replayable_modules(model.policy), len(PROMPTS), max_new_tokens, torch.device("cpu"),
                                   vocabulary, fast_forward.attention_modules() if attention else None,
                                   fast_forward.projection_groups() if layer_buffers else None)
        assert len(recorder.attended) == (model.policy.config.num_hidden_layers if attention else 0)
        for kept in [*recorder.outputs.values(), *recorder.attended.values(), *recorder.logsumexp.values(),
                     *([recorder.logits] if logits else [])]:
            kept.fill_(float("nan"))  # memory a step before left behind: anything unwritten shows
        if rotated_together is not None:
            assert all(layer.rotate_together == rotated_together for layer in fast_forward.layers)
        torch.manual_seed(1)
        rollout = generate_rollout(sampler, tokenizer, PROMPTS, prompts=PROMPTS, group_ids=[0, 0, 1, 0, 1, 2],
                                   columns={}, max_prompt_length=32, max_new_tokens=max_new_tokens, temperature=1.0,
                                   top_p=1.0, share_prompt_prefix=True, eos_token_ids=stops, fast_forward=fast_forward,
                                   recorder=recorder)
    recorder.seal(model.policy)
    rollout.sampled_products = recorder
    return rollout


def _counted_outputs(monkeypatch, replay_class, method="output") -> list[bool]:
    """Per call of ``replay_class.<method>`` from here on, whether it handed out a kept output."""
    taken = []
    handing_out = getattr(replay_class, method)

    def counting(self, *args):
        kept = handing_out(self, *args)
        taken.append(kept is not None)
        return kept

    monkeypatch.setattr(replay_class, method, counting)
    return taken


@pytest.fixture
def replays(monkeypatch):
    """How many projection outputs the forwards after the prefix took from the kept products."""
    from rlhf import sampled_products

    return _counted_outputs(monkeypatch, sampled_products._Replay)


def _logprobs_and_grads(model, rollout, rows=slice(None)):
    from rlhf.rollout import forward_response

    model.zero_grad()
    logprobs, _, entropy = forward_response(model, rollout, rows, 0.7, with_entropy=True)
    (logprobs * rollout.mask[rows]).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy.detach(), grads


def _assert_close(taken, plain):
    for a, b in zip(taken[:2], plain[:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert taken[2].keys() == plain[2].keys() and len(plain[2]) > 10
    for name in plain[2]:
        torch.testing.assert_close(taken[2][name], plain[2][name], rtol=1e-4, atol=1e-5, msg=name)


def _route_every_projection_to_onednn(monkeypatch):
    """Every projection to oneDNN (as SmolLM2's go on AMD and AVX-512 Intel): the sampler then fuses
    q/k/v and gate/up, keeping q, k and v as views of the fused product."""
    from rlhf import cpu_linear

    if not cpu_linear.onednn_packing_usable():
        pytest.skip("this torch build cannot pack oneDNN weights")
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)


@pytest.mark.parametrize("chunked, routed", [(False, False), (True, False), (False, True)])
def test_the_forward_takes_the_samplers_products_and_gives_the_plain_numbers(tiny_model_dir, replays, chunked, routed,
                                                                            monkeypatch):
    """``routed``: every projection goes to oneDNN (as SmolLM2's do on AMD), so the sampler fuses
    q/k/v and gate/up and keeps q, k and v as views of the fused product it rotates q and k from."""
    if routed:
        _route_every_projection_to_onednn(monkeypatch)
    model = _policy(tiny_model_dir, chunked)
    rollout = _sample(model, tiny_model_dir, rotated_together=routed)
    taken = _logprobs_and_grads(model, rollout)
    layers = model.policy.config.num_hidden_layers
    assert replays.count(True) == 7 * layers  # every projection of the suffix forward, none recomputed
    rollout.sampled_products = None
    plain = _logprobs_and_grads(model, rollout)
    _assert_close(taken, plain)
    assert not torch.equal(taken[0], plain[0])  # the kept products were used: the rounding differs


def test_each_rows_products_are_taken_once_and_dropped_once_all_are(tiny_model_dir, replays):
    """A forward over every row takes each module's outputs and the products let go of them (the
    forward keeps what its backward needs); a second forward over the rows computes its own."""
    from rlhf.rollout import forward_response

    model = _policy(tiny_model_dir, False)
    rollout = _sample(model, tiny_model_dir)
    products = rollout.sampled_products
    with torch.no_grad():
        forward_response(model, rollout, torch.tensor([0, 1, 3]), 1.0)  # one group: some rows
        assert len(products.outputs) == 7 * model.policy.config.num_hidden_layers
        forward_response(model, rollout, torch.tensor([2, 4, 5, 0, 1]), 1.0)  # rows 0, 1 again
        assert len(products.outputs) == 7 * model.policy.config.num_hidden_layers
        forward_response(model, rollout, torch.tensor([2, 4, 5]), 1.0)
        assert products.outputs == {}  # every row taken
        forward_response(model, rollout, slice(None), 1.0)
    layers = model.policy.config.num_hidden_layers
    assert replays.count(True) == 2 * 7 * layers  # the first and the third forward
    assert replays.count(False) == 7 * layers  # the second: rows 0 and 1 were taken already


def test_rows_that_left_the_decode_batch_and_a_micro_batchs_rows(tiny_model_dir, replays):
    """Rows that ended early leave the batch: their later positions are never sampled (zeros kept,
    padding in the forward); a micro-batch of some rows, in another order, takes their rows."""
    model = _policy(tiny_model_dir, False)
    rollout = _sample(model, tiny_model_dir, stops=list(range(0, 49152, 4)), max_new_tokens=9)
    products = rollout.sampled_products
    assert (products.tokens == -1).any()  # some rows left early
    for kept in products.outputs.values():  # what was never fed holds zeros, not what the memory held
        assert torch.isfinite(kept).all() and (kept[(products.tokens == -1).t()] == 0).all()
    assert (rollout.mask.sum(-1) < rollout.response_length).any()
    rows = torch.tensor([4, 1, 2, 0])  # two groups (a shared prefix), not in order
    narrowed, _ = rollout.narrowed(rows)
    taken = _logprobs_and_grads(model, narrowed)
    assert replays.count(True) == 7 * model.policy.config.num_hidden_layers
    narrowed.sampled_products = None
    plain = _logprobs_and_grads(model, narrowed)
    mask = narrowed.mask.bool()
    _assert_close((taken[0][mask], taken[1][mask], taken[2]), (plain[0][mask], plain[1][mask], plain[2]))


@pytest.mark.parametrize("stops, routed", [(None, False), (list(range(0, 49152, 4)), False), (None, True)])
def test_a_layers_products_in_one_buffer_are_those_kept_one_by_one(tiny_model_dir, replays, stops, routed,
                                                                   monkeypatch):
    """The trainer's recorder keeps each layer's products side by side in one buffer, which a decode
    step writes as one concatenation: bitwise the buffers of one write per projection, also once
    rows left the decode batch (``stops``: those steps write each projection on its own) and with
    q, k and v views of one fused product (``routed``), and the layer's buffer goes once the forward
    has taken every row of every projection in it."""
    import gc
    import weakref

    from rlhf.rollout import forward_response

    if routed:
        _route_every_projection_to_onednn(monkeypatch)
    model = _policy(tiny_model_dir, False)
    alone = _sample(model, tiny_model_dir, stops=stops, max_new_tokens=9, rotated_together=routed).sampled_products
    together = _sample(model, tiny_model_dir, stops=stops, max_new_tokens=9, rotated_together=routed,
                       layer_buffers=True)
    products = together.sampled_products
    assert torch.equal(alone.tokens, products.tokens)
    assert ((products.tokens == -1).any() and products.tokens[:, 1:].ne(-1).any()) == (stops is not None)
    assert products.outputs.keys() == alone.outputs.keys() and products.written == alone.written
    layers = model.policy.config.num_hidden_layers
    buffers = {id(kept._base): weakref.ref(kept._base) for kept in products.outputs.values()}
    assert len(buffers) == layers and None not in buffers  # one buffer per layer
    for module, kept in alone.outputs.items():
        assert torch.equal(products.outputs[module], kept), module
    del alone, kept
    with torch.no_grad():
        forward_response(model, together, torch.tensor([0, 1, 3]), 1.0)  # some rows: every buffer stays
        gc.collect()
        assert all(buffer() is not None for buffer in buffers.values())
        forward_response(model, together, torch.tensor([2, 4, 5]), 1.0)
    gc.collect()
    assert products.outputs == {} and all(buffer() is None for buffer in buffers.values())
    assert replays.count(True) == 2 * 7 * layers


@pytest.mark.parametrize("change", ["in_place", "data", "fused_adamw", "frozen_in_place", "frozen_data_swap",
                                    "buffer_in_place"])
def test_changed_weights_recompute(tiny_model_dir, replays, change):
    """Any change of the weights after sampling: an in-place op, a write through ``.data`` and a
    fused AdamW step (neither bumps the version counter), an in-place op on a frozen weight, a
    frozen weight's ``.data`` swapped for another tensor (as ``nn.Module._apply`` and
    ``vector_to_parameters`` do: no version counter moves), a buffer changed in place (the rotary
    embedding's frequencies). Before the last two were checked, a forward took the products
    computed with the old weight: gradients 28% off for a swapped frozen weight (helper-49)."""
    from rlhf.rollout import forward_response

    model = _policy(tiny_model_dir, False)
    rollout = _sample(model, tiny_model_dir)
    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        if change == "in_place":
            lora.add_(1e-3)
        elif change == "data":
            lora.data.add_(1e-3)
        elif change == "fused_adamw":
            optimizer = torch.optim.AdamW([lora], lr=1e-3, fused=True)
            lora.grad = torch.ones_like(lora)
            version = lora._version
            optimizer.step()
            assert lora._version == version  # so the version alone would not tell
        elif change == "frozen_in_place":
            frozen.add_(0.0)
        elif change == "frozen_data_swap":
            frozen.data = frozen.data * 1.5
        else:
            next(b for n, b in model.named_buffers() if n.endswith("inv_freq")).mul_(1.01)
        forward_response(model, rollout, slice(None), 1.0)
    assert replays == []


@pytest.mark.parametrize("where", ["response", "prompt", "prompt_padding"])
def test_other_tokens_or_released_products_recompute(tiny_model_dir, replays, where):
    """Another token than the sampled one in a response, or in a row's prompt before its last token
    (before the prompt was compared, a forward over another prompt took the products of the
    sampled one: logprobs up to 0.11 off, helper-49), or a prompt token turned into padding."""
    from rlhf.rollout import forward_response

    model = _policy(tiny_model_dir, False)
    rollout = _sample(model, tiny_model_dir)
    changed, mask = rollout.input_ids.clone(), rollout.attention_mask.clone()
    prompt_column = -rollout.response_length - 2  # every row's prompt, before its last token
    if where == "response":
        changed[2, -2] = (changed[2, -2] + 1) % 49152  # another token than the one sampled there
    elif where == "prompt":
        changed[2, prompt_column] = (changed[2, prompt_column] + 1) % 49152
    else:
        mask[2, prompt_column] = 0
    rollout.input_ids, rollout.attention_mask = changed, mask
    with torch.no_grad():
        forward_response(model, rollout, slice(None), 1.0)
    assert replays == []
    rollout = _sample(model, tiny_model_dir)
    rollout.sampled_products.release()  # spent after the update: nothing left to take
    with torch.no_grad():
        forward_response(model, rollout, slice(None), 1.0)
    assert replays == []


def test_a_projection_the_sampler_never_wrote_is_computed(tiny_model_dir, replays):
    """A module kept but never written (the sampler's forward did not compute it) must not hand
    out its zeros."""
    from rlhf.rollout import forward_response

    model = _policy(tiny_model_dir, False)
    rollout = _sample(model, tiny_model_dir)
    products = rollout.sampled_products
    unwritten = next(iter(products.written))
    products.written.discard(unwritten)
    with torch.no_grad():
        forward_response(model, rollout, slice(None), 1.0)
    assert replays.count(False) == 1 and replays.count(True) == 7 * model.policy.config.num_hidden_layers - 1


@pytest.fixture
def prefix_replays(monkeypatch):
    """How many projection outputs the shared prompt prefix forwards took from the kept prefill."""
    from rlhf import sampled_products

    return _counted_outputs(monkeypatch, sampled_products._PrefixReplay)


@pytest.mark.parametrize("chunked", [False, True])
def test_the_prompt_prefix_takes_the_prefills_products_and_gives_the_plain_numbers(tiny_model_dir, prefix_replays,
                                                                                   chunked):
    """The prefill ran each distinct prompt once; the update's prefix forward takes every
    projection from it, for all rows and for some rows in another order (whose distinct prompts
    map to the prefill's, and which drop the padding columns the long prompt needed), again for a
    second forward, within rounding of the plain numbers."""
    model = _policy(tiny_model_dir, chunked)
    rollout = _sample(model, tiny_model_dir)
    products = rollout.sampled_products
    (prefix,) = products.prefixes
    assert prefix.ids.shape[0] == 3 and set(prefix.outputs) == products.written  # "Hi", the long one, the other
    layers = model.policy.config.num_hidden_layers
    for rows in (slice(None), torch.tensor([4, 1, 2, 0]), torch.tensor([5, 3, 0])):
        part = rollout.narrowed(rows)[0] if isinstance(rows, torch.Tensor) else rollout
        if rows is not None and isinstance(rows, torch.Tensor) and 2 not in rows.tolist():  # no long prompt
            assert part.input_ids.shape[1] < rollout.input_ids.shape[1]  # its padding columns dropped
        prefix_replays.clear()
        taken = _logprobs_and_grads(model, part)
        assert prefix_replays == [True] * 7 * layers, rows
        part.sampled_products = None
        plain = _logprobs_and_grads(model, part)
        mask = part.mask.bool()
        _assert_close((taken[0][mask], taken[1][mask], taken[2]), (plain[0][mask], plain[1][mask], plain[2]))
        part.sampled_products = products
    assert products.prefixes  # taken again as often as asked, until released
    products.release()
    assert products.prefixes == []


def test_a_prefill_output_that_is_part_of_a_fused_product_is_kept_alone():
    """The sampler's fused gate/up product hands out up as a view: kept as is, it would hold the
    whole product (a third more memory than counted)."""
    from rlhf.sampled_products import SampledProducts

    layer = torch.nn.Linear(4, 6)
    products = SampledProducts([], 2, 3, torch.device("cpu"))
    products.outputs = {layer: torch.zeros(3, 2, 6)}
    ids = torch.tensor([[1, 2], [1, 2], [3, 4]])
    fused = torch.randn(2, 2, 12)
    with products.writing_prefix(0, ids, torch.ones_like(ids)):
        products.write(layer, fused[..., 6:])
    kept = products.prefixes[0].outputs[layer]
    assert kept.is_contiguous() and kept.untyped_storage().nbytes() == kept.nbytes
    assert torch.equal(kept, fused[..., 6:])


def test_a_layer_buffer_holds_only_the_kept_projections_of_its_group():
    """A LoRA on some projections only (q and v, say): a layer's buffer holds those, the others'
    outputs are passed along and not kept; rows that left the batch (an index, not a slice) and a
    group with one kept projection write each on its own, the same numbers."""
    from rlhf.sampled_products import SampledProducts

    class Projection(torch.nn.Linear):
        def get_base_layer(self):
            return self

    q, k, v, gate = (Projection(4, width) for width in (6, 2, 3, 5))
    products = SampledProducts([q, v, gate], 4, 3, torch.device("cpu"), groups=[(q, k, v), (gate, k)])
    assert products.outputs[q]._base is products.outputs[v]._base is not None
    assert products.outputs[q]._base.shape == (3, 4, 9) and products.outputs[gate]._base is None
    outputs = {column: [torch.randn(4, 1, m.out_features) for m in (q, k, v)] for column in range(3)}
    gates = {column: torch.randn(4, 1, 5) for column in range(3)}
    ids = torch.arange(4)
    for column, rows in ((0, slice(0, 4)), (1, torch.tensor([0, 2, 3])), (2, slice(1, 3))):
        chosen = rows if isinstance(rows, slice) else rows
        with products.writing(rows, column, ids[chosen]):
            products.write_together((q, k, v), [out[chosen] for out in outputs[column]])
            products.write_together((gate, k), [gates[column][chosen], outputs[column][1][chosen]])
    assert products.written == {q, v, gate}
    for module, index in ((q, 0), (v, 2)):
        kept = products.outputs[module]
        assert torch.equal(kept[0], outputs[0][index][:, 0])
        assert torch.equal(kept[1, [0, 2, 3]], outputs[1][index][[0, 2, 3], 0])
        assert torch.equal(kept[2, 1:3], outputs[2][index][1:3, 0])
    assert torch.equal(products.outputs[gate][0], gates[0][:, 0])


@pytest.mark.parametrize("change", ["weights", "prompt_token", "more_padding", "dropped_tokens", "rows_of_two_chunks"])
def test_the_prompt_prefix_is_computed_where_the_prefill_is_not_its_own(tiny_model_dir, prefix_replays, change):
    from rlhf.rollout import forward_response

    model = _policy(tiny_model_dir, False)
    rollout = _sample(model, tiny_model_dir)
    products = rollout.sampled_products
    prefix = products.prefixes[0]
    if change == "weights":
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_A" in n).data.add_(1e-3)
    elif change == "prompt_token":
        changed = rollout.input_ids.clone()
        changed[:, -rollout.response_length - 2] += 1  # every row's prompt, before its last token
        rollout.input_ids = changed
    elif change == "more_padding":  # the rows padded wider than the prefill saw them (chunks joined)
        prefix.ids, prefix.mask = prefix.ids[:, 1:], prefix.mask[:, 1:]
        prefix.outputs = {module: kept[:, 1:] for module, kept in prefix.outputs.items()}
    elif change == "dropped_tokens":  # rows without the long prompt drop columns that must be padding
        prefix.mask = prefix.mask.clone()
        prefix.mask[:, 0] = 1
        rollout = rollout.narrowed(torch.tensor([5, 3, 0]))[0]
    else:  # the kept prefill covers rows 0-2 only: a forward over all six runs its own
        prefix.inverse = prefix.inverse[:3]
    with torch.no_grad():
        forward_response(model, rollout, slice(None), 1.0)
    assert not any(prefix_replays)


def test_products_are_kept_only_where_they_fit_and_would_be_taken(tiny_model_dir, monkeypatch):
    from rlhf import cpu_linear
    from rlhf.rollout import sampled_products_bytes
    from rlhf.sampled_products import SampledProducts

    model = _policy(tiny_model_dir, False)
    needed = SampledProducts.bytes_needed(model.policy, 6, 7)
    config = model.policy.config
    per_position = 4 * config.num_hidden_layers * (3 * config.hidden_size + config.num_key_value_heads * 2 * (
        config.hidden_size // config.num_attention_heads) + 2 * config.intermediate_size)
    assert needed == 6 * 7 * per_position
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * needed)
    assert sampled_products_bytes(model, 6, 7, True) == needed
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * needed - 4)
    assert sampled_products_bytes(model, 6, 7, True) == 0
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * needed + 1000)
    assert sampled_products_bytes(model, 6, 7, True, reserve_bytes=1000) == needed  # the KV cache comes first
    assert sampled_products_bytes(model, 6, 7, True, reserve_bytes=1004) == 0
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 10 * needed)
    assert sampled_products_bytes(model, 6, 7, False) == 0  # tool episodes, sharded weights
    model.share_prompt_prefix = False  # the forward that would take them never runs
    assert sampled_products_bytes(model, 6, 7, True) == 0


def _remembered_products(monkeypatch) -> list:
    """The ``sampled_products`` of every rollout the trainer samples from here on, in order."""
    from rlhf import rollout as rollout_module

    kept = []
    sample_rollout = rollout_module.sample_rollout

    def remembering(*args, **kwargs):
        result = sample_rollout(*args, **kwargs)
        kept.append(result.sampled_products)
        return result

    monkeypatch.setattr("rlhf.trainer.sample_rollout", remembering)
    return kept


def test_a_grpo_step_takes_the_products_and_releases_them(tiny_model_dir, tmp_path, replays, monkeypatch):
    """Through the trainer: the update takes every projection of its forward from the sampler,
    the step's numbers match a step that recomputes them, and the products go once it is done."""
    from test_correctness import make_trainer

    from rlhf import rollout as rollout_module

    kept = _remembered_products(monkeypatch)

    def step(reuse):
        if not reuse:
            monkeypatch.setattr(rollout_module, "sampled_products_bytes", lambda *args: 0)
        torch.manual_seed(0)
        trainer = make_trainer(tiny_model_dir, tmp_path / str(reuse), "grpo", max_new_tokens=6)
        return trainer.train_step()

    taken = step(True)
    assert replays.count(True) > 0 and kept[-1] is not None and not kept[-1].outputs and not kept[-1].prefixes
    plain = step(False)
    assert kept[-1] is None
    for name in ("policy_loss", "grad_norm", "entropy", "reward_mean"):
        assert taken[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("case", ["groups", "one_sample_per_prompt", "window_inside", "window_beyond", "trpo_groups"])
def test_products_are_kept_only_where_a_forward_can_take_them(tiny_model_dir, tmp_path, monkeypatch, case):
    """Without groups no two rows share a prompt, so no forward runs after a shared prefix; a
    sliding window the sequence can reach hands the steps past it to the model's own forward,
    which keeps nothing: either way the products would only take memory (found by a review).
    TRPO's groups keep none either: its step must see old logprobs from its own forward."""
    import contextlib

    from test_correctness import make_trainer

    from rlhf import rollout as rollout_module

    speedups = rollout_module.sampling_speedups

    @contextlib.contextmanager
    def windowed(*args, **kwargs):
        with speedups(*args, **kwargs) as (policy, fast_forward):
            fast_forward.window = {"window_inside": 10, "window_beyond": 10_000}.get(case)
            yield policy, fast_forward

    monkeypatch.setattr(rollout_module, "sampling_speedups", windowed)
    one = {"num_generations": 1, "rollout_batch_size": 8}
    trpo = {"update_method": "trpo", "advantage_estimator": "grpo"}
    algorithm, overrides = {"one_sample_per_prompt": ("ppo", one), "trpo_groups": ("trpo", trpo)}.get(case, ("grpo", {}))
    trainer = make_trainer(tiny_model_dir, tmp_path, algorithm, **overrides)
    rollout = trainer.rollout()
    assert (rollout.sampled_products is not None) == (case in ("groups", "window_beyond"))


@pytest.mark.parametrize("rows", [[4, 1, 5, 0], [2, 3, 4], [3]])
def test_a_micro_batchs_rows_are_copied_out_once_in_its_order(tiny_model_dir, rows):
    """A shuffled minibatch's rows (the update's randperm) come out of the time-major buffer
    [columns, rows, out] in the forward's row order in one copy: gathering the rows first and then
    transposing copied every output twice (issue 21: 3.0 vs 0.44 ms per output at 16 rows x 128
    columns x 1536). Bitwise the buffer's values, and the buffer itself is handed out only for a
    single row (a view, as before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf.sampled_products import _Replay

    model = _policy(tiny_model_dir, False)
    products = _sample(model, tiny_model_dir).sampled_products
    module, kept = next(iter(products.outputs.items()))
    expected = kept.clone()
    rows, width = torch.tensor(rows), kept.shape[0] - 1
    replay = _Replay(products, rows, width)
    x = torch.zeros(len(rows), width, module.in_features)
    copies = []

    class Copies(TorchDispatchMode):  # the storage of each call's output as large as what is handed out
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= len(rows) * width * kept.shape[-1] > 1:
                copies.append((str(func), out.untyped_storage().data_ptr()))
            return out

    with Copies():
        output = replay.output(module, x)
    assert torch.equal(output, expected[:width, rows].transpose(0, 1).reshape(-1, kept.shape[-1]))
    buffer = kept.untyped_storage().data_ptr()
    made = {storage for _, storage in copies if storage != buffer}
    if rows.tolist() == [3]:  # one row, sliced out: its [w, out] is a view of the buffer (as before)
        assert not made and output.untyped_storage().data_ptr() == buffer
    else:  # consecutive rows sliced out and copied, others gathered: one new tensor either way
        assert len(made) == 1 and output.untyped_storage().data_ptr() in made, copies


@pytest.fixture
def projections(monkeypatch):
    """How many row chunks the chunked logprobs projected through the LM head (rather than took)."""
    from rlhf.algorithms import logits

    calls = []
    project = logits.times_transposed

    def counting(hidden, weight):
        calls.append(hidden.shape[0])
        return project(hidden, weight)

    monkeypatch.setattr(logits, "times_transposed", counting)
    return calls


@pytest.mark.parametrize("entropy_gradient", [False, True])
def test_the_chunked_logprobs_take_the_samplers_logits_and_give_the_plain_numbers(tiny_model_dir, projections,
                                                                                  entropy_gradient):
    """The sampler kept its logits: the update's chunked logprobs copy them out instead of projecting
    the hidden states through the LM head again (issue 21), and give the plain forward's logprobs,
    entropy and gradients (an entropy bonus's too) up to float rounding; rows of two groups, out of order."""
    from rlhf.models import PolicyWithValue

    model = _policy(tiny_model_dir, True)
    rollout = _sample(model, tiny_model_dir, logits=True)
    rows = torch.tensor([4, 1, 2, 0, 5, 3])

    def run():
        model.zero_grad()
        logprobs, _, entropy = PolicyWithValue.forward(
            model, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.position_ids[rows],
            rollout.response_length, labels=rollout.response_ids[rows], temperature=0.7, with_entropy=True,
            entropy_gradient=entropy_gradient, sampled=rollout.sampled(rows))
        mask = rollout.mask[rows]
        ((logprobs * mask).sum() + (entropy * mask).sum() * entropy_gradient).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logprobs.detach(), entropy.detach(), grads

    taken = run()
    assert projections == []  # no chunk went through the LM head
    assert rollout.sampled_products.logits is None  # every row taken: the buffer is let go
    rollout.sampled_products = None
    plain = run()
    assert projections  # the plain forward projects
    _assert_close(taken, plain)
    assert not torch.equal(taken[0], plain[0])  # the kept logits were used: the rounding differs


def test_each_rows_logits_are_taken_once(tiny_model_dir, projections):
    """A second forward over rows whose logits were taken projects its own; rows that ended early
    hold zeros where the sampler fed nothing (finite, whatever the memory held before)."""
    from rlhf.rollout import forward_response

    model = _policy(tiny_model_dir, True)
    rollout = _sample(model, tiny_model_dir, logits=True, stops=list(range(0, 49152, 4)), max_new_tokens=9)
    products = rollout.sampled_products
    unfed = (products.tokens == -1).t()
    assert unfed.any() and torch.isfinite(products.logits).all() and (products.logits[unfed] == 0).all()
    plain = rollout.select([0, 1, 3])
    plain.sampled_products = None
    with torch.no_grad():
        expected = forward_response(model, plain, slice(None), 1.0)[0]
        projections.clear()
        first = forward_response(model, rollout, torch.tensor([0, 1, 3]), 1.0)[0]
        assert projections == [] and products.logits is not None  # rows 2, 4, 5 are still to take
        again = forward_response(model, rollout, torch.tensor([0, 1, 3]), 1.0)[0]
        assert projections  # taken already: projected
    mask = rollout.mask[[0, 1, 3]].bool()
    torch.testing.assert_close(first[mask], expected[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again[mask], expected[mask], rtol=1e-4, atol=1e-5)


def test_logits_are_kept_where_the_update_chunks_and_memory_holds_them(tiny_model_dir, tmp_path, monkeypatch):
    """Through the trainer: the rollout keeps the sampler's logits with the default chunked logprobs,
    not where the update projects full logits (``chunked_logprobs_mb`` none or above one position's),
    nor where a quarter of the free memory holds the products but not the logits too; a GRPO step
    takes them all and lets them go."""
    from test_correctness import make_trainer

    from rlhf import cpu_linear
    from rlhf.sampled_products import SampledProducts

    def rollout_of(name, **overrides):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_model_dir, tmp_path / name, "grpo", max_new_tokens=6, **overrides)
        return trainer, trainer.rollout()

    trainer, rollout = rollout_of("default")
    vocabulary = trainer.unwrapped.policy.get_output_embeddings().weight.shape[0]
    assert rollout.sampled_products.logits.shape == (6, len(rollout), vocabulary)
    assert rollout_of("full", chunked_logprobs_mb=None)[1].sampled_products.logits is None
    assert rollout_of("above", chunked_logprobs_mb=1.0)[1].sampled_products.logits is None
    products = SampledProducts.bytes_needed(trainer.unwrapped.policy, len(rollout), 6)
    with_logits = SampledProducts.bytes_needed(trainer.unwrapped.policy, len(rollout), 6, vocabulary)
    assert with_logits == products + 4 * len(rollout) * 6 * vocabulary
    from rlhf import rollout as rollout_module

    reserve = {}
    bytes_needed = rollout_module.sampled_products_bytes

    def remembering(model, rows, columns, eligible, reserve_bytes=0, vocabulary=0, attention_bytes=0):
        reserve["bytes"] = reserve_bytes
        return bytes_needed(model, rows, columns, eligible, reserve_bytes, vocabulary, attention_bytes)

    monkeypatch.setattr(rollout_module, "sampled_products_bytes", remembering)
    rollout_of("probe")
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * products + reserve["bytes"])
    squeezed = rollout_of("squeezed")[1].sampled_products
    assert squeezed is not None and squeezed.outputs and squeezed.logits is None
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * with_logits + reserve["bytes"])
    assert rollout_of("fits")[1].sampled_products.logits is not None
    kept = _remembered_products(monkeypatch)
    torch.manual_seed(0)
    make_trainer(tiny_model_dir, tmp_path / "step", "grpo", max_new_tokens=6).train_step()
    assert bool(kept[-1].logits_taken.all()) and kept[-1].logits is None  # every row's taken, then let go


def test_a_reference_pass_with_the_adapters_off_projects_its_own_logits(tiny_model_dir, projections):
    """With the adapters switched off (the KL term's reference pass) the forward takes none of the
    sampler's products, so its hidden states are the base model's: it must not take the sampler's
    logits either, which are the policy's (found by the old-logprob test with a KL term: the
    reference logprobs came out as the policy's)."""
    from rlhf.models import adapters_off
    from rlhf.rollout import forward_response

    model = _policy(tiny_model_dir, True)
    rollout = _sample(model, tiny_model_dir, logits=True)
    plain = rollout.select(list(range(len(rollout))))
    plain.sampled_products = None
    with torch.no_grad():
        with adapters_off(model.policy):
            expected = forward_response(model, plain, slice(None), 1.0)[0]
            projections.clear()
            reference = forward_response(model, rollout, slice(None), 1.0)[0]
            assert projections  # projected, not taken
        assert not rollout.sampled_products.logits_taken.any()
        policy = forward_response(model, plain, slice(None), 1.0)[0]
    mask = rollout.mask.bool()
    torch.testing.assert_close(reference[mask], expected[mask], rtol=1e-4, atol=1e-5)
    assert (policy[mask] - reference[mask]).abs().max() > 1e-3  # the adapter moves them: the test can tell


# --- the attention outputs: the update's SDPA forward taken from the sampler's decode steps ---

def _sdpa_inputs(batch=3, heads=4, kv_heads=2, width=5, prefix=6, dim=8, seed=0):
    """q [b, heads, w, d], k, v [b, kv heads, prefix + w, d] with gradients, and the causal boolean
    mask [b, 1, w, prefix + w] of a left-padded batch after a prompt prefix (as the update's forward has)."""
    generator = torch.Generator().manual_seed(seed)
    columns = prefix + width
    query = torch.randn(batch, heads, width, dim, generator=generator, requires_grad=True)
    key = torch.randn(batch, kv_heads, columns, dim, generator=generator, requires_grad=True)
    value = torch.randn(batch, kv_heads, columns, dim, generator=generator, requires_grad=True)
    causal = torch.arange(columns)[None, :] <= torch.arange(prefix, columns)[:, None]
    mask = causal.expand(batch, 1, width, columns).clone()
    mask[0, ..., :2] = False  # left padding in one row
    return query, key, value, mask


def test_the_kept_attention_function_is_sdpas_given_its_output_and_logsumexp():
    """Given SDPA's own output and log-sum-exp, the autograd function returns that output and SDPA's
    gradients bitwise (grouped heads, a padded mask); positions kept as never fed (output 0,
    log-sum-exp +inf) with a zero output gradient, as a row's positions after its end have, give
    the same gradients as SDPA's backward there, where exp(score - lse) would otherwise overflow."""
    import torch.nn.functional as F

    from rlhf.sampled_products import _KeptAttention, additive_mask

    query, key, value, mask = _sdpa_inputs()
    scale = query.shape[-1] ** -0.5
    plain = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    grad = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
    grad[1, :, -2:] = 0.0  # row 1's last two positions predict nothing
    expected = torch.autograd.grad(plain, (query, key, value), grad)
    detached = [t.detach() for t in (query, key, value)]
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *detached, 0.0, False, attn_mask=additive_mask(mask), scale=scale)
    # laid out as the replay hands them out: row-major [b, w, heads * d] and [b, w, heads], transposed
    kept = output.transpose(1, 2).reshape(output.shape[0], output.shape[2], -1).clone()
    kept_output = kept.view(*kept.shape[:2], query.shape[1], -1).transpose(1, 2)
    kept_logsumexp = logsumexp.transpose(1, 2).contiguous().transpose(1, 2)
    attended = _KeptAttention.apply(query, key, value, kept_output, kept_logsumexp, additive_mask(mask), scale)
    assert torch.equal(attended, plain.detach())
    for taken, wanted in zip(torch.autograd.grad(attended, (query, key, value), grad), expected):
        assert torch.equal(taken, wanted)
    unfed_output, unfed_logsumexp = kept_output.clone(), kept_logsumexp.clone()
    unfed_output[1, :, -2:], unfed_logsumexp[1, :, -2:] = 0.0, float("inf")
    attended = _KeptAttention.apply(query, key, value, unfed_output, unfed_logsumexp, additive_mask(mask), scale)
    taken = torch.autograd.grad(attended, (query, key, value), grad)
    assert all(bool(torch.isfinite(t).all()) for t in taken)
    for taken_grad, wanted in zip(taken, expected):
        torch.testing.assert_close(taken_grad, wanted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["boolean", "additive", "none"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_decode_attention_is_transformers_sdpa_bitwise_with_its_logsumexp(mask_kind, kv_heads):
    """One query position, as the sampler decodes: the output is transformers' SDPA attention
    function's, bitwise (grouped heads packed as transformers packs them), and the log-sum-exp is
    the softmax's normaliser; None where SDPA would take another kernel than its CPU flash one."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf.sampled_products import additive_mask, decode_attention

    query, key, value, mask = _sdpa_inputs(kv_heads=kv_heads, width=1)
    query, key, value = query.detach(), key.detach(), value.detach()
    given = {"boolean": mask, "additive": additive_mask(mask), "none": None}[mask_kind]
    module = SimpleNamespace(num_key_value_groups=query.shape[1] // kv_heads, is_causal=True)
    expected, _ = sdpa_attention_forward(module, query, key, value, given, dropout=0.0, scaling=0.3)
    output, logsumexp = decode_attention(module, query, key, value, given, 0.3)
    assert torch.equal(output.contiguous(), expected)
    grouped_key = key.repeat_interleave(module.num_key_value_groups, 1)
    scores = (query @ grouped_key.transpose(-1, -2))[:, :, 0] * 0.3
    if given is not None:
        scores = scores + additive_mask(mask)[:, :, 0]
    torch.testing.assert_close(logsumexp, torch.logsumexp(scores, -1))
    with sdpa_kernel(SDPBackend.MATH):
        assert decode_attention(module, query, key, value, given, 0.3) is None
    assert decode_attention(module, query.double(), key.double(), value.double(), given, 0.3) is None


def _attention_calls(monkeypatch) -> list[bool]:
    """Per call of ``_Replay.attention`` from here on, whether it handed out the kept attention."""
    from rlhf import sampled_products

    return _counted_outputs(monkeypatch, sampled_products._Replay, "attention")


@pytest.mark.parametrize("stops", [None, "early"])
def test_the_update_takes_the_samplers_attention_and_gives_the_plain_numbers(tiny_model_dir, replays, monkeypatch,
                                                                           stops):
    """The sampler keeps each decode step's attention output and log-sum-exp; the update's forward
    takes them for every layer instead of running SDPA's forward, each row once, and its logprobs,
    entropy and gradients are the plain forward's up to float rounding (rows that ended early
    included: their positions after the end hold zeros and an infinite log-sum-exp). Sampling is
    bitwise the same with and without keeping them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhf.sampled_products import _kept_attention_installed

    calls = _attention_calls(monkeypatch)
    model = _policy(tiny_model_dir, True)
    early = list(range(0, 49152, 4)) if stops == "early" else None
    rollout = _sample(model, tiny_model_dir, attention=True, stops=early, max_new_tokens=9 if early else 7)
    without = _sample(model, tiny_model_dir, stops=early, max_new_tokens=9 if early else 7)
    assert torch.equal(rollout.response_ids, without.response_ids)
    assert torch.equal(rollout.sampler_logprobs, without.sampler_logprobs)
    products = rollout.sampled_products
    layers = model.policy.config.num_hidden_layers
    if early:
        assert (products.tokens == -1).any()
    for attended, logsumexp in zip(products.attended.values(), products.logsumexp.values()):
        unfed = products.tokens == -1  # row-major
        assert not attended.isnan().any() and (attended[unfed] == 0).all()
        assert (logsumexp[unfed] == float("inf")).all() and torch.isfinite(logsumexp[~unfed]).all()
    taken = _logprobs_and_grads(model, rollout)
    assert calls.count(True) == layers and products.attended == {} and products.logsumexp == {}
    products_only = _logprobs_and_grads(model, without)  # the kept products, the update's own attention
    without.sampled_products = None
    plain = _logprobs_and_grads(model, without)
    mask = rollout.mask.bool()
    _assert_close((taken[0][mask], taken[1][mask], taken[2]), (plain[0][mask], plain[1][mask], plain[2]))
    # the kept attention was used: the gradients' rounding differs (the forward's values come from the
    # kept products either way: o's output is the sampler's, its input only enters the backward)
    assert any(not torch.equal(taken[2][name], products_only[2][name]) for name in plain[2])
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # put back once the forward is done
    with _kept_attention_installed():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def test_the_kept_attention_is_taken_only_with_the_samplers_q_k_v(tiny_model_dir, monkeypatch):
    """A second forward over rows already taken, a forward whose q/k/v the sampler did not give
    (those products recomputed), and a user's own "sdpa" attention function all compute SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhf import sampled_products
    from rlhf.rollout import forward_response

    calls = _attention_calls(monkeypatch)
    model = _policy(tiny_model_dir, True)
    layers = model.policy.config.num_hidden_layers
    rollout = _sample(model, tiny_model_dir, attention=True)
    with torch.no_grad():
        forward_response(model, rollout, torch.tensor([0, 1, 3]), 1.0)
        assert calls.count(True) == layers
        forward_response(model, rollout, torch.tensor([0, 1, 3]), 1.0)  # taken already
        assert calls.count(True) == layers and len(calls) == 2 * layers
    rollout = _sample(model, tiny_model_dir, attention=True)
    output = sampled_products._Replay.output

    def without_queries(self, module, x):  # the q projections computed afresh
        return None if module in {qkv[0] for qkv in self.products.attention_inputs.values()} else output(self, module, x)

    monkeypatch.setattr(sampled_products._Replay, "output", without_queries)
    calls.clear()
    with torch.no_grad():
        forward_response(model, rollout, slice(None), 1.0)
    assert calls == [False] * layers
    monkeypatch.setattr(sampled_products._Replay, "output", output)
    rollout = _sample(model, tiny_model_dir, attention=True)
    own = []

    def users_sdpa(*args, **kwargs):
        own.append(True)
        return sdpa_attention_forward(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = users_sdpa
    try:
        calls.clear()
        with torch.no_grad():
            forward_response(model, rollout, slice(None), 1.0)
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert calls == [] and len(own) == 2 * layers  # the prompt prefix's forward and the response's


def test_a_decode_step_that_kept_no_attention_drops_it():
    """A step that wrote the products but not an attention's output (a prompt fed whole, another
    SDPA kernel) leaves that attention's buffers with a position it never filled: dropped, so no
    forward takes them."""
    from torch import nn

    from rlhf.sampled_products import SampledProducts

    linear, attention = nn.Linear(4, 8), nn.Module()
    attention.head_dim = 4
    linear.get_base_layer = lambda: linear
    products = SampledProducts([linear], 2, 3, torch.device("cpu"), attentions={attention: (linear, linear, linear)})
    with products.writing(slice(0, 2), 0, torch.tensor([5, 6])):
        assert products.keeps_attention(attention)
        products.write(linear, torch.ones(2, 1, 8))
        products.write_attention(attention, torch.ones(2, 1, 8), torch.zeros(2, 2))
    assert attention in products.attended
    with products.writing(slice(0, 2), 1, torch.tensor([7, 8])):
        products.write(linear, torch.ones(2, 1, 8))
    assert attention not in products.attended and not products.keeps_attention(attention)


def test_attention_outputs_are_kept_where_memory_holds_them_too(tiny_model_dir, tmp_path, monkeypatch):
    """Through the trainer: a GRPO rollout keeps every layer's attention output beside the products,
    not where a quarter of the free memory holds the products and logits but not them too; the
    step takes them all and lets them go."""
    from test_correctness import make_trainer

    from rlhf import cpu_linear
    from rlhf import rollout as rollout_module

    def rollout_of(name):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_model_dir, tmp_path / name, "grpo", max_new_tokens=6)
        return trainer, trainer.rollout()

    trainer, rollout = rollout_of("default")
    layers = trainer.unwrapped.policy.config.num_hidden_layers
    assert len(rollout.sampled_products.attended) == layers
    budget = {}
    bytes_needed = rollout_module.sampled_products_bytes

    def remembering(model, rows, columns, eligible, reserve_bytes=0, vocabulary=0, attention_bytes=0):
        budget.setdefault(bool(attention_bytes), []).append((reserve_bytes, vocabulary, attention_bytes))
        return bytes_needed(model, rows, columns, eligible, reserve_bytes, vocabulary, attention_bytes)

    monkeypatch.setattr(rollout_module, "sampled_products_bytes", remembering)
    rollout_of("probe")
    reserve, vocabulary, attention_bytes = budget[True][-1]
    from rlhf.sampled_products import SampledProducts

    without = SampledProducts.bytes_needed(trainer.unwrapped.policy, len(rollout), 6, vocabulary)
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * without + reserve)
    squeezed = rollout_of("squeezed")[1].sampled_products
    assert squeezed.outputs and squeezed.attended == {}
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * (without + attention_bytes) + reserve)
    assert len(rollout_of("fits")[1].sampled_products.attended) == layers
    monkeypatch.undo()
    kept = _remembered_products(monkeypatch)
    calls = _attention_calls(monkeypatch)
    torch.manual_seed(0)
    make_trainer(tiny_model_dir, tmp_path / "step", "grpo", max_new_tokens=6).train_step()
    assert calls.count(True) == layers and kept[-1].attended == {}


def test_a_copy_that_stops_fitting_mid_run_is_told_once(tiny_model_dir, tmp_path, monkeypatch):
    """Keeping the sampler's products moves the numbers by float rounding, and whether they fit
    follows the memory free at each step: a run whose heap grew until they no longer fit at step 3
    leaves them off from there (and a run resumed at step 2 in a fresh process may keep them and
    end 1e-8 away: a reviewer's run under ``ulimit -v``). The run says so, once; until 2026-12-07
    it changed its numbers silently."""
    import warnings

    from test_correctness import make_trainer

    from rlhf import cpu_linear
    from rlhf import rollout as rollout_module

    monkeypatch.setattr(cpu_linear, "_first_memory", {})
    monkeypatch.setattr(cpu_linear, "_memory_choices_told", set())
    memory = {"bytes": 1 << 40}
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: memory["bytes"])
    kept = _remembered_products(monkeypatch)
    trainer = make_trainer(tiny_model_dir, tmp_path, "grpo", max_steps=4, max_new_tokens=6)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        trainer.train_step()
        trainer.train_step()
        memory["bytes"] = rollout_module.sampled_products_bytes(trainer.unwrapped, 2, 6, True) * 3  # short of 4x
        trainer.train_step()
        trainer.train_step()
    assert [products is not None for products in kept] == [True, True, False, False]
    about = [str(w.message) for w in told if "no longer fit" in str(w.message)]
    assert len(about) == 1 and "products kept for the update no longer fit" in about[0], about
    assert "a run resumed from an earlier checkpoint may choose otherwise" in about[0]


def test_a_second_run_in_one_process_compares_its_memory_with_its_own_start(tiny_model_dir, tmp_path, monkeypatch):
    """A notebook that trains twice: the second trainer, started with less memory free, leaves the
    products off from its first step, and nothing in its run changed; until 2026-12-07 it was told
    they 'no longer fit as the memory free changed', measured against the first run's memory."""
    import warnings

    from test_correctness import make_trainer

    from rlhf import cpu_linear
    from rlhf import rollout as rollout_module

    monkeypatch.setattr(cpu_linear, "_first_memory", {})
    monkeypatch.setattr(cpu_linear, "_memory_choices_told", set())
    memory = {"bytes": 1 << 40}
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: memory["bytes"])
    kept = _remembered_products(monkeypatch)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        first = make_trainer(tiny_model_dir, tmp_path / "first", "grpo", max_new_tokens=6)
        first.train_step()
        memory["bytes"] = rollout_module.sampled_products_bytes(first.unwrapped, 2, 6, True) * 3  # short of 4x
        second = make_trainer(tiny_model_dir, tmp_path / "second", "grpo", max_new_tokens=6)
        second.train_step()
        second.train_step()
    assert [products is not None for products in kept] == [True, False, False]
    assert not [str(w.message) for w in told if str(w.message).startswith("memory: ")]


def test_memory_choice_tells_a_change_the_memory_made_once_and_no_other(monkeypatch):
    """A copy's size changes with each batch's shapes, which a resumed run sees alike: only an answer
    that the memory free at the process's first call would have given otherwise is told (a reviewer's
    run with the memory held still was told its prefill products 'no longer fit as the memory free
    changed' when only its prompts had grown)."""
    import warnings

    from rlhf import cpu_linear

    monkeypatch.setattr(cpu_linear, "_first_memory", {})
    monkeypatch.setattr(cpu_linear, "_memory_choices_told", set())
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 1000)

    def under(needed):
        return lambda memory: needed <= memory // 4

    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        answers = [cpu_linear.memory_choice("products", under(needed)) for needed in (200, 260, 240)]
        assert not told  # 1000 bytes throughout: the batches' sizes alone decided
        answers += [cpu_linear.memory_choice("products", under(200), memory) for memory in (700, 600, 1000, 500)]
        answers.append(cpu_linear.memory_choice("logits", under(100), 300))
        answers.append(cpu_linear.memory_choice("logits", under(100), 400))
    assert answers == [True, False, True, False, False, True, False, False, True]
    assert [str(w.message).split(" fit")[0] for w in told] == ["memory: the products no longer",
                                                                "memory: the logits now"]
