"""rlhf.cpu_linear: oneDNN products where this machine runs them faster, and the choice itself."""

import pytest
import torch

from rlhf import cpu_linear

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_usable(), reason="this torch build has no oneDNN linear")


@needs_onednn
def test_onednn_linear_is_f_linear_to_float_rounding():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40), torch.randn(48)
    for x in (torch.randn(5, 40), torch.randn(2, 7, 40), torch.randn(0, 40)):
        assert torch.allclose(cpu_linear.onednn_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                              atol=1e-5)
    grad = torch.randn(9, 48)  # the input gradient's layout: a transposed weight view
    assert torch.allclose(cpu_linear.onednn_linear(grad, weight.t()), grad @ weight, atol=1e-5)
    strided_bias = torch.randn(96)[::2]  # oneDNN alone would read it as contiguous
    x = torch.randn(5, 40)
    assert torch.allclose(cpu_linear.onednn_linear(x, weight, strided_bias),
                          torch.nn.functional.linear(x, weight, strided_bias), atol=1e-5)


def _close(got, expected):  # float32 rounding of another summation order, relative to the tensor's scale
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def _lora_step(route, monkeypatch, create_graph=False):
    from rlhf.models import lora_linear

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: route)
    torch.manual_seed(0)
    x = (0.1 * torch.randn(3, 70, 256)).requires_grad_()
    weight, bias = 0.1 * torch.randn(320, 256), torch.randn(320)  # above MIN_WEIGHT_ELEMENTS
    lora_a, lora_b = (0.1 * torch.randn(4, 256)).requires_grad_(), (0.1 * torch.randn(320, 4)).requires_grad_()
    out = lora_linear(x, weight, bias, lora_a, lora_b, 0.5)
    grads = torch.autograd.grad((out ** 2).sum(), (x, lora_a, lora_b), create_graph=create_graph)
    if create_graph:  # TRPO's Fisher-vector products differentiate the gradient again
        grads = torch.autograd.grad(sum(g.sum() for g in grads), (x, lora_a))
    return out.detach(), grads


@needs_onednn
def test_fused_lora_layer_on_onednn_gives_the_blas_values_and_gradients(monkeypatch):
    routed = []
    real = cpu_linear.onednn_linear
    for where in ("rlhf.models.onednn_linear", "rlhf.cpu_linear.onednn_linear"):  # forward; input gradient
        monkeypatch.setattr(where, lambda *args: routed.append(1) or real(*args))
    out_blas, grads_blas = _lora_step(False, monkeypatch)
    assert not routed
    out_dnn, grads_dnn = _lora_step(True, monkeypatch)
    assert len(routed) == 2  # the forward product and the input gradient
    assert _close(out_dnn, out_blas)
    for got, expected in zip(grads_dnn, grads_blas):
        assert _close(got, expected)
    # second derivatives: the backward's own product stays on the differentiable path
    routed.clear()
    _, second_blas = _lora_step(False, monkeypatch, create_graph=True)
    _, second_dnn = _lora_step(True, monkeypatch, create_graph=True)
    # the forward, and the plain first-order backward inside the second grad; the create_graph
    # backward took the differentiable product (or the second derivatives would differ)
    assert len(routed) == 2
    for got, expected in zip(second_dnn, second_blas):
        assert _close(got, expected)


def test_routing_takes_plain_float32_cpu_products_of_large_enough_weights_only(monkeypatch):
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    weight = torch.zeros(256, 256)
    assert cpu_linear.routes_to_onednn(torch.zeros(2, 16, 256), weight, torch.zeros(256))
    assert not cpu_linear.routes_to_onednn(torch.zeros(2, 16, 32), torch.zeros(64, 32))  # per-call cost wins
    assert not cpu_linear.routes_to_onednn(torch.zeros(2, 256, dtype=torch.bfloat16), weight.bfloat16())
    assert not cpu_linear.routes_to_onednn(torch.zeros(2, 256, dtype=torch.float64), weight.double())
    assert not cpu_linear.routes_to_onednn(torch.zeros(2, 256), weight, torch.zeros(256, dtype=torch.bfloat16))
    assert not cpu_linear.routes_to_onednn(torch.zeros(2, 256), weight.to("meta"))  # not loaded (offloaded)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain layer would compute in bfloat16
        assert not cpu_linear.routes_to_onednn(torch.zeros(2, 256), weight)
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: False)
    assert not cpu_linear.routes_to_onednn(torch.zeros(2, 16, 256), weight)


def test_fused_layers_leave_base_layers_with_their_own_forward_alone(monkeypatch):
    """An offload hook or wrapper on the base layer loads or changes the weight in its forward:
    the adapter-off pass and the fused LoRA layer must call it, not read the weight (which may
    not be loaded)."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models import fuse_lora_layers

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(256, 320)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    assert fuse_lora_layers(model) == 1
    base = model.base_model.model.proj.base_layer
    base.forward = lambda x: torch.full((*x.shape[:-1], 320), 7.0)  # what the hook would compute
    with torch.no_grad(), model.disable_adapter():
        assert bool((model(torch.randn(3, 256)) == 7.0).all())
    # with the adapter on too: peft's own forward (base layer called, then the LoRA term; B is 0)
    assert bool((model(torch.randn(3, 256)) == 7.0).all())
    del base.forward
    x = torch.randn(3, 256)
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(model(x), torch.nn.functional.linear(x, base.weight, base.bias), atol=1e-5)


@pytest.mark.parametrize("value, vendor, capability, expected", [
    ("auto", "AuthenticAMD", "AVX2", True), ("auto", "AuthenticAMD", "AVX512", True),
    ("auto", "GenuineIntel", "AVX512", True), ("auto", "GenuineIntel", "AVX2", False),
    ("auto", "GenuineIntel", "", False), ("auto", "", "AVX512", False), ("", "AuthenticAMD", "AVX2", True),
    ("blas", "AuthenticAMD", "AVX2", False), ("BLAS ", "GenuineIntel", "AVX512", False),
    ("onednn", "GenuineIntel", "AVX2", True)])
def test_the_choice_is_oneDNN_on_AMD_and_AVX512_Intel_unless_the_environment_says_otherwise(
        monkeypatch, value, vendor, capability, expected):
    monkeypatch.setenv(cpu_linear.ENV, value)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_linear, "cpu_capability", lambda: capability)
    cpu_linear.use_onednn.cache_clear()
    try:
        assert cpu_linear.use_onednn() is (expected and cpu_linear.onednn_usable())
    finally:
        cpu_linear.use_onednn.cache_clear()


def test_the_vendor_is_read_off_this_machine():
    import platform

    vendor = cpu_linear.cpu_vendor()
    if platform.machine() == "x86_64" and open("/proc/cpuinfo").read().count("vendor_id"):
        assert vendor in open("/proc/cpuinfo").read() and vendor
    else:
        assert vendor == ""


def test_an_unknown_backend_name_is_a_config_error(monkeypatch):
    from rlhf.errors import ConfigError

    monkeypatch.setenv(cpu_linear.ENV, "mkl")
    cpu_linear.use_onednn.cache_clear()
    try:
        with pytest.raises(ConfigError, match="RLHF_CPU_LINEAR must be auto, onednn or blas, got 'mkl'"):
            cpu_linear.use_onednn()
    finally:
        cpu_linear.use_onednn.cache_clear()


def test_an_unknown_backend_name_stops_a_training_run_in_one_line(tiny_model_dir, tmp_path, run_here):
    from conftest import assert_one_line_error, tiny_args

    cpu_linear.use_onednn.cache_clear()
    try:
        result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "run"), env={cpu_linear.ENV: "mkl"})
    finally:
        cpu_linear.use_onednn.cache_clear()
    assert_one_line_error(result, "RLHF_CPU_LINEAR must be auto, onednn or blas, got 'mkl'")


needs_packing = pytest.mark.skipif(not cpu_linear.onednn_packing_usable(), reason="this torch cannot pack oneDNN weights")


@needs_packing
def test_a_packed_weight_gives_the_plain_weights_products_bitwise_from_two_rows():
    torch.manual_seed(0)
    weight, bias = torch.randn(320, 256) / 16, torch.randn(320)
    packed = cpu_linear.pack_for_onednn(weight)
    for x in (torch.randn(2, 256), torch.randn(16, 256), torch.randn(17, 256), torch.randn(300, 256),
              torch.randn(5, 1, 256), torch.randn(3, 7, 256)):
        assert torch.equal(cpu_linear.onednn_linear(x, packed, bias), cpu_linear.onednn_linear(x, weight, bias))
    one_row = torch.randn(1, 256)  # another kernel: rounding only (inference_linears keeps the plain weight)
    assert torch.allclose(cpu_linear.onednn_linear(one_row, packed, bias),
                          cpu_linear.onednn_linear(one_row, weight, bias), atol=1e-5)


@needs_packing
def test_sampling_packs_each_routed_weight_once_and_samples_the_same(tiny_model_dir, monkeypatch):
    """Packing changes no sample or logprob; a weight is packed once for all decode steps, again
    when it changes, and not at all when memory is short."""
    from rlhf import models
    from rlhf.models import inference_linears, load_base_model
    from rlhf.rollout import sample_responses

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    packs = []
    monkeypatch.setattr(models, "pack_for_sampling", lambda weight: packs.append(1) or cpu_linear.pack_for_sampling(weight))
    model = load_base_model(str(tiny_model_dir)).eval()
    ids = torch.randint(0, 1000, (5, 7))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0

    def sample(packing):
        monkeypatch.setattr(models, "onednn_packing_usable", lambda: packing)
        torch.manual_seed(3)
        with torch.no_grad(), inference_linears(model):
            return sample_responses(model, ids, attention, max_new_tokens=6, temperature=1.0, top_p=1.0,
                                    eos_token_ids=[10 ** 6], pad_token_id=0)

    plain_tokens, plain_logprobs = sample(False)
    assert not packs
    tokens, logprobs = sample(True)
    assert torch.equal(tokens, plain_tokens) and torch.equal(logprobs, plain_logprobs)
    assert len(packs) == 1  # the tied LM head, the one weight large enough to route (tiny layers stay on BLAS)

    packs.clear()
    x = torch.randn(4, 32)
    with torch.no_grad(), inference_linears(model):
        before = model.lm_head(x)
        model.lm_head.weight.mul_(2.0)  # changed in place: packed again, the product follows
        after = model.lm_head(x)
        model.lm_head.weight.div_(2.0)
    assert len(packs) == 2 and torch.allclose(after, 2 * before, rtol=1e-5, atol=1e-5)

    packs.clear()
    original = model.lm_head.weight.data
    with torch.no_grad(), inference_linears(model):
        before = model.lm_head(x)
        model.lm_head.weight.data = 3 * original  # new storage under the same Parameter: packed again
        after = model.lm_head(x)
        model.lm_head.weight.data = original
    assert len(packs) == 2 and torch.allclose(after, 3 * before, rtol=1e-5, atol=1e-5)

    packs.clear()
    monkeypatch.setattr(models, "available_memory_bytes", lambda: 0)
    assert torch.equal(sample(True)[0], plain_tokens) and not packs


@needs_packing
def test_strided_weights_and_replaced_weights_are_not_held(monkeypatch):
    """A weight with strided rows (packing would change its rounding) keeps the plain product; a
    weight replaced inside the context is not kept alive by its packed copy."""
    import gc
    import weakref

    from rlhf import models
    from rlhf.models import inference_linears

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    packs = []
    monkeypatch.setattr(models, "pack_for_sampling", lambda weight: packs.append(1) or cpu_linear.pack_for_sampling(weight))
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 777)
    layer.weight = torch.nn.Parameter(torch.randn(777, 600)[:, 150:450])  # column slice: row stride 600
    x = torch.randn(5, 300)
    with torch.no_grad(), inference_linears(layer):
        assert torch.equal(layer(x), cpu_linear.onednn_linear(x, layer.weight, layer.bias)) and not packs
        layer.weight = torch.nn.Parameter(torch.randn(777, 300))
        layer(x)
        assert len(packs) == 1
        old = weakref.ref(layer.weight)
        layer.weight = torch.nn.Parameter(torch.randn(777, 300))
        gc.collect()
        assert old() is None


def test_autocast_keeps_each_layers_own_precision(monkeypatch):
    """Under CPU autocast a layer computes as autocast decides (bfloat16 here), also the few-row
    product that BLAS machines take as W @ x^T (it returned float32 with a bias before)."""
    from rlhf.models import inference_linears

    for route in (False, True):
        monkeypatch.setattr(cpu_linear, "use_onednn", lambda route=route: route)
        torch.manual_seed(0)
        layer = torch.nn.Linear(256, 320)
        x = torch.randn(3, 256)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            plain = layer(x)
            with inference_linears(layer):
                got = layer(x)
        assert got.dtype == plain.dtype == torch.bfloat16 and torch.equal(got, plain)


@needs_onednn
def test_kept_transposed_weights_give_the_strided_products_bitwise_once_per_scope(monkeypatch, onednn_transposes):
    """Inside ``transposed_weights_kept`` a frozen weight's transpose is copied once and reused;
    the products (and a fused LoRA layer's gradients) are bitwise those of the strided view; a
    weight changed in place is copied again; the copies go when the scope ends; one row, a strided
    weight, a weight with gradient, an inference-mode tensor and a machine short of memory keep
    the view."""
    from rlhf.models import lora_linear

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 320)
    model.requires_grad_(False)
    weight = model.weight
    lora_a, lora_b = (0.1 * torch.randn(4, 256)).requires_grad_(), (0.1 * torch.randn(320, 4)).requires_grad_()

    def grads():
        x = torch.randn(3, 70, 256, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = lora_linear(x, weight, model.bias, lora_a, lora_b, 0.5)
        return torch.autograd.grad((out ** 2).sum(), (x, lora_a, lora_b))

    plain = grads()
    grad = torch.randn(17, 320)
    with cpu_linear.transposed_weights_kept(model):
        kept = grads()
        assert list(cpu_linear._transposed_copies.copies) == [weight.data_ptr()]
        copy = cpu_linear._transposed_copies.copies[weight.data_ptr()][2]
        assert torch.equal(copy, weight.t())
        assert torch.equal(cpu_linear.times_weight(grad, weight), cpu_linear.onednn_linear(grad, weight.t()))
        assert cpu_linear._transposed_copies.copies[weight.data_ptr()][2] is copy  # reused, not copied again
        weight.mul_(2.0)  # changed in place: copied again, the product follows
        assert torch.equal(cpu_linear.times_weight(grad, weight), cpu_linear.onednn_linear(grad, weight.t()))
        assert cpu_linear._transposed_copies.copies[weight.data_ptr()][2] is not copy
        weight.div_(2.0)
        one_row = torch.randn(1, 320)  # another kernel for a single row: the view's rounding kept
        assert torch.equal(cpu_linear.times_weight(one_row, weight), cpu_linear.onednn_linear(one_row, weight.t()))
        strided = torch.randn(320, 512)[:, 100:356]
        trained = torch.randn(320, 256, requires_grad=True)
        with torch.inference_mode():  # no version counter to tell a change by
            made_in_inference_mode = torch.randn(320, 256)
        for other in (strided, trained, made_in_inference_mode):
            assert torch.equal(cpu_linear.times_weight(grad, other), cpu_linear.onednn_linear(grad, other.t()))
        assert len(cpu_linear._transposed_copies.copies) == 1
    assert cpu_linear._transposed_copies is None
    for got, expected in zip(kept, plain):
        assert torch.equal(got, expected)

    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 0)
    with cpu_linear.transposed_weights_kept(model):
        short = grads()
        assert cpu_linear._transposed_copies is None
    for got, expected in zip(short, plain):
        assert torch.equal(got, expected)


@needs_onednn
@pytest.mark.parametrize("times, pays", [
    ({1536: (10.0, 6.0), 576: (10.0, 6.0)}, True),   # the copy clearly faster at both shapes (the AVX2 EPYC)
    ({1536: (10.0, 9.9), 576: (10.0, 10.2)}, False),  # alike (the Zen 4 EPYC)
    ({1536: (10.0, 6.0), 576: (10.0, 9.0)}, False),  # faster at one shape only: a busy machine's doing
    ({1536: (10.0, 14.0), 576: (10.0, 14.0)}, False),  # the copy slower
])
def test_transposed_copies_are_kept_only_where_their_products_are_clearly_faster(monkeypatch, times, pays):
    """``transposed_copies_pay`` compares oneDNN's best time through a contiguous transposed copy
    with the strided view's, at two shapes, and says yes only where the copy takes under 0.85 of
    the view's time at both; an update then opens its copies, elsewhere none. Driven by a clock
    that each product advances by its path's time (weight rows -> (view, copy)), with the first
    calls of each path slow (their reorders) and one timed view call hit by a burst of load."""
    clock = {"now": 0.0, "calls": 0}
    real_linear = cpu_linear.onednn_linear

    def timed_linear(x, weight, bias=None):
        view, copy = times.get(weight.shape[1], (1.0, 1.0))  # by the weight's rows, either layout
        clock["calls"] += 1
        burst = 100.0 if clock["calls"] in (1, 2, 7) else 0.0
        clock["now"] += (copy if weight.is_contiguous() else view) + burst
        return real_linear(x, weight, bias)

    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    monkeypatch.setattr(cpu_linear, "transposed_copy_exact", lambda: True)
    monkeypatch.setattr(cpu_linear, "onednn_linear", timed_linear)
    monkeypatch.setattr(cpu_linear, "_clock", lambda: clock["now"])
    cpu_linear.transposed_copies_pay.cache_clear()
    try:
        found = cpu_linear.transposed_copies_pay()
        model = torch.nn.Linear(256, 320).requires_grad_(False)
        with cpu_linear.transposed_weights_kept(model):
            scope_open = cpu_linear._transposed_copies is not None
            got = cpu_linear.times_weight(torch.ones(17, 320), model.weight)
    finally:
        cpu_linear.transposed_copies_pay.cache_clear()
    assert found is pays and scope_open is pays
    assert torch.equal(got, real_linear(torch.ones(17, 320), model.weight.t()))


def test_the_copies_probe_says_no_where_it_cannot_tell(monkeypatch):
    """No probe where a copy's products would not be the view's bitwise, and no error out of the
    first update where a product fails at the probe's shapes: both leave the view in place. (Here,
    with real products, it answers either way without error: which way is this CPU's.)"""
    if cpu_linear.onednn_usable():
        monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
        assert cpu_linear.transposed_copies_pay.__wrapped__() in (True, False)
    monkeypatch.setattr(cpu_linear, "transposed_copy_exact", lambda: False)
    assert not cpu_linear.transposed_copies_pay.__wrapped__()

    def failing(x, weight, bias=None):
        raise RuntimeError("could not create a primitive")
    monkeypatch.setattr(cpu_linear, "transposed_copy_exact", lambda: True)
    monkeypatch.setattr(cpu_linear, "onednn_linear", failing)
    assert not cpu_linear.transposed_copies_pay.__wrapped__()


@needs_onednn
def test_kept_transposes_take_at_most_half_the_memory_free_once_the_forward_holds_its_activations(
        monkeypatch, onednn_transposes):
    """The memory is read again when the first copy is wanted, besides when the update starts:
    a long batch's forward takes memory after the scope opens, and copies made on top of it could
    run a step out of memory that fits without them. Copies stop at half of what is free then;
    the weights past that keep the strided view, with the same products. Short at the start: no
    copies at all, as before."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(256, 320), torch.nn.Linear(320, 256)).requires_grad_(False)
    first, second = layers[0].weight, layers[1].weight
    grads = torch.randn(17, 320), torch.randn(17, 256)
    free = {"bytes": 10 ** 12}
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: free["bytes"])

    with cpu_linear.transposed_weights_kept(layers):
        free["bytes"] = 0  # the forward's activations took what the update started with
        products = [cpu_linear.times_weight(g, w) for g, w in zip(grads, (first, second))]
        assert not cpu_linear._transposed_copies.copies
    for got, (g, w) in zip(products, zip(grads, (first, second))):
        assert torch.equal(got, cpu_linear.onednn_linear(g, w.t()))

    free["bytes"] = 10 ** 12
    with cpu_linear.transposed_weights_kept(layers):
        free["bytes"] = 2 * first.nbytes + 1  # room for one copy (half of what is free), not two
        products = [cpu_linear.times_weight(g, w) for g, w in zip(grads, (first, second))]
        assert list(cpu_linear._transposed_copies.copies) == [first.data_ptr()]
        assert torch.equal(cpu_linear.times_weight(grads[1], second), cpu_linear.onednn_linear(grads[1], second.t()))
        assert list(cpu_linear._transposed_copies.copies) == [first.data_ptr()]  # no room made later
        first.mul_(2.0)  # a stale copy is replaced within the same bytes
        assert torch.equal(cpu_linear.times_weight(grads[0], first), cpu_linear.onednn_linear(grads[0], first.t()))
        assert torch.equal(cpu_linear._transposed_copies.copies[first.data_ptr()][2], first.t())
        assert cpu_linear._transposed_copies.budget == free["bytes"] // 2 - first.nbytes
        first.div_(2.0)
    for got, (g, w) in zip(products, zip(grads, (first, second))):
        assert torch.equal(got, cpu_linear.onednn_linear(g, w.t()))

    free["bytes"] = 0  # short when the update starts: no copies, whatever comes later
    with cpu_linear.transposed_weights_kept(layers):
        free["bytes"] = 10 ** 12
        cpu_linear.times_weight(grads[0], first)
        assert cpu_linear._transposed_copies is None


@needs_onednn
def test_kept_transposes_leave_room_for_the_updates_largest_micro_batch(monkeypatch, onednn_transposes):
    """The update sorts micro-batches by length, so the first copy is wanted while the shortest
    one's activations are in memory: what it took since the update started, scaled to the largest
    micro-batch's token positions, is kept free before half of the rest goes to copies. Told
    after the budget was read, or with the largest no longer than the running one, nothing changes."""
    layer = torch.nn.Linear(256, 320).requires_grad_(False)
    weight, grad = layer.weight, torch.randn(17, 320)
    start = 10 ** 9
    free = {"bytes": start}
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: free["bytes"])

    def budget_after(running: int, largest: int, held: int) -> int:
        free["bytes"] = start
        with cpu_linear.transposed_weights_kept(layer):
            cpu_linear.expect_micro_batch(running, largest)
            free["bytes"] = start - held  # the running micro-batch's forward took this
            cpu_linear.times_weight(grad, weight)
            cpu_linear.expect_micro_batch(1, 10 ** 6)  # too late: the budget is read once
            copies = len(cpu_linear._transposed_copies.copies)
            return cpu_linear._transposed_copies.budget + copies * weight.nbytes

    held = 10 ** 8
    assert budget_after(100, 100, held) == (start - held) // 2
    assert budget_after(100, 40, held) == (start - held) // 2
    assert budget_after(100, 400, held) == (start - held - 3 * held) // 2  # 3 x more to come
    assert budget_after(100, 1000, held) == 0  # the largest takes all: no copy
    assert budget_after(100, 400, -held) == (start + held) // 2  # memory came back: nothing to scale
    free["bytes"] = start
    with cpu_linear.transposed_weights_kept(layer):
        cpu_linear.expect_micro_batch(100, 1000)
        free["bytes"] = start - held
        product = cpu_linear.times_weight(grad, weight)
        assert not cpu_linear._transposed_copies.copies
    assert torch.equal(product, cpu_linear.onednn_linear(grad, weight.t()))
    cpu_linear.expect_micro_batch(1, 2)  # no scope open: nothing to tell


def test_processes_on_one_machine_each_count_their_share_of_its_free_memory(monkeypatch):
    """Processes a launcher started on this machine sample and update in step, and each sizes
    its weight copies by ``available_memory_bytes``: each counts an even share of the system's
    free memory, plus what its own heap holds free."""
    import types

    monkeypatch.setattr("psutil.virtual_memory", lambda: types.SimpleNamespace(available=8 * 2 ** 30))
    monkeypatch.setattr("rlhf.cpu_memory.reusable_heap_bytes", lambda: 2 ** 30)
    monkeypatch.setattr("rlhf.cpu_memory.cgroup_memory_headroom", lambda: None)  # no limit, no cap
    monkeypatch.setattr("rlhf.cpu_memory.address_space_headroom", lambda: None)
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                 "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_linear.available_memory_bytes() == 9 * 2 ** 30
    monkeypatch.setenv("WORLD_SIZE", "4")  # every process on this machine
    assert cpu_linear.available_memory_bytes() == 3 * 2 ** 30
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")  # Open MPI: one of them here
    assert cpu_linear.available_memory_bytes() == 9 * 2 ** 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two of the four here
    assert cpu_linear.available_memory_bytes() == 5 * 2 ** 30


@needs_onednn
def test_a_kept_transpose_serves_only_the_tensor_it_was_made_of(onednn_transposes):
    """Copies are found by storage address; another tensor at that address (a ``.data`` swap frees
    a weight's storage for the next allocation) with the same shape and version gets its own."""
    weight, impostor = torch.randn(320, 256), torch.randn(320, 256)
    grad = torch.randn(9, 320)
    with cpu_linear.transposed_weights_kept(torch.nn.Linear(256, 320).requires_grad_(False)):
        cpu_linear._transposed_copies.budget = 10 ** 12
        stale = (impostor, weight._version, cpu_linear.transposed_copy(impostor))
        cpu_linear._transposed_copies.copies[weight.data_ptr()] = stale
        product = cpu_linear.times_weight(grad, weight)
        assert cpu_linear._transposed_copies.copies[weight.data_ptr()][0] is weight
    assert torch.equal(product, cpu_linear.onednn_linear(grad, weight.t()))


@needs_onednn
def test_a_stale_kept_transpose_gives_its_bytes_back_before_its_replacement_is_weighed(monkeypatch,
                                                                                      onednn_transposes):
    """The same storage seen as a weight of another shape: the stale copy is dropped first and
    its bytes credited, so the live copies never exceed the budget, and a replacement that does
    not fit leaves no stale copy behind."""
    storage = torch.randn(640 * 256)
    small, large = storage[: 320 * 256].view(320, 256), storage.view(640, 256)
    assert small.data_ptr() == large.data_ptr()
    grad_small, grad_large = torch.randn(9, 320), torch.randn(9, 640)
    free = {"bytes": 10 ** 12}
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: free["bytes"])
    with cpu_linear.transposed_weights_kept(torch.nn.Linear(256, 640).requires_grad_(False)):
        free["bytes"] = 2 * large.nbytes  # a budget of exactly the large copy
        cpu_linear.times_weight(grad_small, small)
        assert cpu_linear._transposed_copies.budget == large.nbytes - small.nbytes
        product = cpu_linear.times_weight(grad_large, large)
        assert torch.equal(product, cpu_linear.onednn_linear(grad_large, large.t()))
        (kept,) = cpu_linear._transposed_copies.copies.values()
        assert kept[2].shape == (256, 640) and cpu_linear._transposed_copies.budget == 0
    free["bytes"] = 10 ** 12
    with cpu_linear.transposed_weights_kept(torch.nn.Linear(256, 640).requires_grad_(False)):
        free["bytes"] = 2 * large.nbytes - 2  # the large copy no longer fits
        cpu_linear.times_weight(grad_small, small)
        product = cpu_linear.times_weight(grad_large, large)
        assert torch.equal(product, cpu_linear.onednn_linear(grad_large, large.t()))
        assert not cpu_linear._transposed_copies.copies  # the stale small copy is gone, not charged
        assert cpu_linear._transposed_copies.budget == large.nbytes - 1


@needs_onednn
def test_the_chunked_lm_heads_gradient_directions_are_bitwise_the_same_with_kept_transposes(monkeypatch,
                                                                                           onednn_transposes):
    import rlhf.algorithms.logits as logits_module
    from rlhf.algorithms import logprobs_from_hidden

    monkeypatch.setattr(logits_module, "CHUNK_LOGITS", 4096 * 9)  # 9 rows per chunk
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 4096, bias=False).requires_grad_(False)
    labels = torch.randint(0, 4096, (2, 10))
    upstream = torch.randn(2, 10), torch.randn(2, 10)

    def run():
        hidden = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        logprobs, entropy = logprobs_from_hidden(hidden, head.weight, labels, 0.8, with_entropy=True,
                                                 entropy_gradient=True)
        (grad,) = torch.autograd.grad((logprobs * upstream[0]).sum() + (entropy * upstream[1]).sum(), hidden)
        return logprobs, entropy, grad

    plain = run()
    with cpu_linear.transposed_weights_kept(head):
        kept = run()
        assert list(cpu_linear._transposed_copies.copies) == [head.weight.data_ptr()]
    for got, expected in zip(kept, plain):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(3, 5), (512, 7), (513, 7), (1000, 9), (2 * 256 * 3 + 17, 4)])
def test_a_blockwise_transposed_copy_is_the_transpose(monkeypatch, shape):
    from rlhf import cpu_linear

    weight = torch.randn(*shape)
    copy = cpu_linear.transposed_copy(weight)
    assert copy.is_contiguous() and torch.equal(copy, weight.t())
    monkeypatch.setattr(cpu_linear, "TRANSPOSE_BLOCK_ROWS", 3)  # blocks that do not divide the rows
    copy = cpu_linear.transposed_copy(weight)
    assert copy.is_contiguous() and torch.equal(copy, weight.t())
