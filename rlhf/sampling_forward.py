"""The sampler's forward pass for Llama-family models, without transformers' module stack.

A decode step of SmolLM2-135M at 16 rows spends about a fifth of its time outside the products:
in ``nn.Module.__call__``, transformers' decorators and keyword plumbing, and peft's wrapper
around every linear layer (which, with the LoRA folded into the weights, only forwards to the
base layer). ``SamplingForward`` runs the same operations on the same modules' weights, in the
same order, as ``LlamaForCausalLM.forward`` (and Mistral's, Qwen2's, Qwen3's), from one loop over
the layers; attention goes through the model's own attention function, the mask through
transformers' ``create_causal_mask`` and the rotary embedding through the model's module, so the
logits and the KV cache are bitwise those of the model's forward.

Where ``rlhf.models.inference_linears`` sends the projections to oneDNN with packed weights,
each layer's q/k/v and gate/up projections also run as one product each, through their weights
concatenated and packed once (a GEMM with N = q+k+v outputs gives each output the same float32
result as its own GEMM: checked bitwise for 2 to 777 rows on six shapes, with and without bias,
at 2 to 32 threads; a single row keeps the separate products, as ``inference_linears`` keeps the
plain weight there). Each part is made contiguous before use: an activation reads a strided
tensor through another kernel and rounds some elements differently.

Where every projection goes to oneDNN, sampling folds the LoRA into this forward's own packed
weights instead of into the model's (``sampling_forward(fold=True)``, ``_pack_folded``): the
model keeps its weights and adapters, and only the packed copy is held while sampling.

A LoRA left unfolded (a bfloat16 base: the small early deltas would round away in its weights)
runs as peft runs it, its base product (fused with its neighbours' in bfloat16 too, where
``inference_linears`` packs bfloat16 weights) followed by peft's own operations for the adapter.

Measured on the 2-core EPYC (SmolLM2-135M float32, LoRA folded, 16 rows, alternating in one
process): the model's forward 91.7 ms per sampled token (64 tokens, median of 4), this forward
80.8 without fusing, and the decode step alone 63.4 -> 56.0 ms with the fused products (median
of 6); identical tokens and logprobs. In bfloat16 with the LoRA unfolded, 16 rows x 64 tokens
with packed weights: 5.5-6.4 s through the model's forward, 4.6-5.3 s through this one (4
alternating runs), identical tokens and logprobs.

Where the fused q/k/v product feeds Llama's rotary embedding directly (no per-head q/k norms, no
unfolded LoRA on q/k/v), q and k are rotated as one tensor viewed from that product
(``rotate_query_key``), with no contiguous copies of q, k and v first; o and down run through
``inference_linears``' packed copies of their weights, called directly, past its per-call checks.
A decode step at 16 rows, 128-224 cached tokens (the two alternating with the plain path step by
step in one process, median of 24 steps each, three processes): 56.2 / 59.0 / 56.9 -> 53.4 /
56.2 / 53.0 ms (an earlier three, the machine slower: 69.0 / 70.1 / 78.0 -> 66.1 / 65.8 / 69.7),
each of the two about half of it; identical logits and cache (tested), fixed-seed GRPO identical
metrics and adapter. Tried and not kept here: attention as two matmuls (not faster
at 48 or 300 cached tokens, and not bitwise), ``F.rms_norm`` for the norms (bitwise equal, not
faster), an earlier form of rotating q and k heads in one op (not faster; the one above reads q
and k straight from the fused product, with no copies of them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from rlhf import cpu_linear
from rlhf.cpu_linear import (available_memory_bytes, memory_choice, onednn_packing_usable, pack_for_sampling,
                              packed_linear, routes_to_onednn)
from rlhf.kv_cache import ordinary_tensors

# The architectures whose decoder layer is exactly norm -> attention (q/k/v, rotary, cache, o) ->
# residual -> norm -> gated MLP -> residual; their modules' class names start with the prefix.
SUPPORTED = {
    "LlamaForCausalLM": "Llama",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3",  # also normalises each q/k head (q_norm, k_norm)
}


@dataclass
class SamplingOutput:
    """What the sampler reads off a forward: logits [B, kept, V] and the updated cache."""

    logits: Tensor
    cache: Any


@dataclass
class _Layer:
    input_norm: Callable[[Tensor], Tensor]
    post_attention_norm: Callable[[Tensor], Tensor]
    q_norm: Callable[[Tensor], Tensor] | None  # Qwen3: per head, before the rotary embedding
    k_norm: Callable[[Tensor], Tensor] | None
    q: Callable[[Tensor], Tensor]
    k: Callable[[Tensor], Tensor]
    v: Callable[[Tensor], Tensor]
    o: Callable[[Tensor], Tensor]
    gate: Callable[[Tensor], Tensor]
    up: Callable[[Tensor], Tensor]
    down: Callable[[Tensor], Tensor]
    act: Callable[[Tensor], Tensor]
    attention: nn.Module  # the model's attention module, handed to its attention function
    q_width: int
    k_width: int
    intermediate: int
    qkv: tuple[Tensor, Tensor | None] | None = None  # packed [q; k; v] base weight and bias, when fused
    gate_up: tuple[Tensor, Tensor | None] | None = None
    # each fused part's LoRA term, (x, its base product) -> its output; None: the base product is it
    qkv_lora: list[Callable[[Tensor, Tensor], Tensor] | None] | None = None
    gate_up_lora: list[Callable[[Tensor, Tensor], Tensor] | None] | None = None
    # o and down through inference_linears' packed copies of their weights, called directly (its
    # forward would take the same product after its per-call checks), and their LoRA terms as above
    o_packed: tuple[Tensor, Tensor | None] | None = None
    down_packed: tuple[Tensor, Tensor | None] | None = None
    o_lora: Callable[[Tensor, Tensor], Tensor] | None = None
    down_lora: Callable[[Tensor, Tensor], Tensor] | None = None
    # q and k rotated as one tensor straight from the fused product (``rotate_query_key``)
    rotate_together: bool = False
    # the projection modules (q, k, v, o, gate, up, down): their outputs are kept under these keys
    modules: tuple[nn.Module, ...] = ()


# The projections whose products the forward fuses: q/k/v into one, gate/up into another.
FUSED = ("q", "k", "v", "gate", "up")


@dataclass
class _Projection:
    """How the model computes one projection module, called without ``nn.Module.__call__``."""

    forward: Callable[[Tensor], Tensor]  # x -> the module's output
    base: nn.Linear | None  # the nn.Linear whose product the output starts from (None: not fusable)
    lora: Callable[[Tensor, Tensor], Tensor] | None = None  # (x, base product) -> the output


def _one_plain_adapter(module: Any) -> tuple[bool, str | None]:
    """For a peft LoRA ``Linear`` with its adapters on and unmerged: whether a forward here can
    follow its adapters (one active, no ``fan_in_fan_out``, no variant such as DoRA, dropout
    inert, A and B plain ``nn.Linear``), and the adapter active on it (None: none is, and peft
    runs the base layer alone)."""
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return True, None
    name = active[0]
    dropout = module.lora_dropout[name]  # peft calls it; in eval mode it returns its input itself
    inert_dropout = type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.training)
    return (len(active) == 1 and not module.fan_in_fan_out and name not in module.lora_variant and inert_dropout
            and isinstance(module.lora_A[name], nn.Linear) and isinstance(module.lora_B[name], nn.Linear)), name


def projection(module: nn.Module) -> _Projection | None:
    """``module`` as the model's forward computes it: a plain ``nn.Linear``, a peft LoRA layer with
    its adapters off (``merged_lora_weights`` samples that way) or merged (its base layer alone),
    or a peft LoRA layer with one plain adapter active and unmerged (a bfloat16 base, whose LoRA
    cannot be folded in: peft's own forward past the base product, below; its dropout, if any, in
    eval mode); a LoRA layer whose forward is set on the instance (``rlhf.models.fuse_lora_layers``)
    runs that forward. None for anything else (another LoRA kind or layer type, several active
    adapters on the layer, ``fan_in_fan_out``, dropout in training mode)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return _Projection(module.forward, module) if isinstance(module, nn.Linear) else None
    base = module.get_base_layer()
    if not isinstance(base, nn.Linear):
        return None
    if module.disable_adapters != module.merged:  # peft then runs the base layer alone
        return _Projection(base.forward, base)
    if type(module) is not LoraLinear or module.merged:  # merged and disabled: peft unmerges first
        return None
    if "forward" in vars(module):
        return _Projection(module.forward, None)
    followable, name = _one_plain_adapter(module)
    if not followable:
        return None
    if name is None:  # the active adapter leaves this layer alone: peft runs the base layer
        return _Projection(base.forward, base)
    lora_a, lora_b = module.lora_A[name].forward, module.lora_B[name].forward  # inference_linears' where set
    scaling, dtype = module.scaling[name], module.lora_A[name].weight.dtype
    cast = getattr(module, "cast_input_dtype_enabled", True)

    def lora(x: Tensor, result: Tensor) -> Tensor:
        # peft's LoRA Linear.forward past its base product, operation for operation (one active
        # adapter, no dropout): the input cast to the adapter's dtype, the scaled low-rank term
        # added in the promoted dtype, the sum cast back to the base product's
        result_dtype = result.dtype
        if cast and x.dtype != dtype:
            x = x.to(dtype=dtype)
        result = result + lora_b(lora_a(x)) * scaling
        return result.to(result_dtype)

    return _Projection(lambda x: lora(x, base.forward(x)), base, lora)


def _hooked(model: nn.Module) -> bool:
    """Whether calling a module's ``forward`` directly would skip something its call runs.

    transformers' output-capturing hooks do not count: its models install them on their layers
    the first time a forward asks for hidden states or attentions (a value head's forward does,
    so every rollout after the first would lose this forward), and they record only inside such
    a forward (an active collector), which sampling never is. Nor does transformers'
    ``enable_input_require_grads`` hook on the input embeddings (installed for gradient
    checkpointing with frozen embeddings, as peft and the trainer do): it only marks the
    embeddings' output as requiring grad, which under sampling's ``no_grad`` records nothing."""
    from torch.nn.modules import module as torch_module

    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or getattr(torch_module, "_global_forward_hooks_always_called", None)):
        return True
    return any(any(not (_output_capturing(hook) or _marks_inputs_for_grad(hook)) for hook in m._forward_hooks.values())
               or m._forward_pre_hooks
               or hasattr(m, "_hf_hook") or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _marks_inputs_for_grad(hook: Callable[..., Any]) -> bool:
    """Whether ``hook`` is transformers' ``enable_input_require_grads`` hook (modeling_utils)."""
    return (getattr(hook, "__module__", None) == "transformers.modeling_utils"
            and getattr(hook, "__name__", None) == "make_inputs_require_grads")


def _output_capturing(hook: Callable[..., Any]) -> bool:
    """Whether ``hook`` is transformers' output-capturing forward hook (transformers.utils.output_capturing)."""
    return (getattr(hook, "__module__", None) == "transformers.utils.output_capturing"
            and getattr(hook, "__name__", None) == "output_capturing_hook")


def _stock(module: nn.Module, class_name: str, modeling: str) -> bool:
    """Whether ``module`` runs transformers' own forward of ``class_name``, from ``modeling``: this
    forward replaces it without calling it, so a patched class (Liger, unsloth) or a forward set
    on the instance must keep the model's own (but ``rlhf.models.fuse_swiglu_mlps``' forward,
    which computes the class's numbers)."""
    cls = type(module)
    own = vars(module).get("forward")  # set on the instance: only one that computes the class's own numbers
    return (cls.__name__ == class_name and cls.__module__ == modeling
            and (own is None or (getattr(own, "__self__", None) is module
                                 and getattr(getattr(own, "__func__", None), "stock_math", False)))
            and getattr(cls.forward, "__module__", None) == modeling)


@dataclass
class _Fold:
    """One projection's weight as the sampler's packed copy holds it: ``base``'s W, plus s * B @ A
    where ``lora`` = (A [r, in], B [out, r], s) is its active adapter (None: W alone)."""

    base: nn.Linear
    lora: tuple[Tensor, Tensor, float] | None


def folding(module: nn.Module) -> _Fold | None:
    """``module``'s weight with its LoRA folded in, W + s * B @ A, as ``rlhf.models.merged_lora_weights``
    folds it: a float32 ``nn.Linear`` (its W alone), a peft LoRA layer whose adapters are off or
    merged, or with no adapter active on it (its base's W), or a float32 LoRA ``Linear`` with one
    plain adapter active and unmerged. None for anything else (DoRA and other variants, a bias on
    B, ``fan_in_fan_out``, dropout in training mode, several active adapters, another dtype or
    layer type): the sampler then keeps the model's own weights."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    def plain(linear: nn.Module) -> bool:  # inference_linears' forward computes the class's numbers
        own = vars(linear).get("forward")
        return (type(linear) is nn.Linear and linear.weight.dtype == torch.float32
                and (own is None or getattr(own, "inference_linear", False)))

    if not isinstance(module, LoraLayer):
        return _Fold(module, None) if plain(module) else None
    base = module.get_base_layer()
    if not plain(base):
        return None
    if module.disable_adapters != module.merged:  # peft runs the base layer alone
        return _Fold(base, None)
    if type(module) is not LoraLinear or module.merged:
        return None
    followable, name = _one_plain_adapter(module)
    if not followable:
        return None
    if name is None:
        return _Fold(base, None)
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if (getattr(module, "lora_bias", {}).get(name, False)
            or lora_a.weight.dtype != torch.float32 or lora_b.weight.dtype != torch.float32):
        return None
    return _Fold(base, (lora_a.weight, lora_b.weight, module.scaling[name]))


def _pack_folded(folds: list[_Fold]) -> tuple[Tensor, Tensor | None]:
    """[W1 + s1 B1 A1; W2 + s2 B2 A2; ...] packed for oneDNN, and the biases concatenated.

    Each folded weight is written by the ``addmm`` ``merged_lora_weights`` uses, straight into its
    rows of one buffer that lives only until it is packed: no folded copy of the model's weights
    is held while sampling, only the packed one."""
    with torch.no_grad():
        weights = [fold.base.weight for fold in folds]
        merged = weights[0].new_empty(sum(weight.shape[0] for weight in weights), weights[0].shape[1])
        for fold, rows in zip(folds, merged.split([weight.shape[0] for weight in weights])):
            if fold.lora is None:
                rows.copy_(fold.base.weight)
            else:
                lora_a, lora_b, scaling = fold.lora
                torch.addmm(fold.base.weight, lora_b, lora_a, alpha=scaling, out=rows)
        bias = None if folds[0].base.bias is None else torch.cat([fold.base.bias for fold in folds])
        return pack_for_sampling(merged), bias


def _fusable(linears: list[nn.Linear | None]) -> bool:
    """Whether ``inference_linears`` sends every one of ``linears`` to oneDNN with a packed weight
    (float32 where oneDNN is this machine's choice; bfloat16 wherever it packs them), so that one
    product through their concatenated packed weights gives each of them its own product bitwise."""
    if any(layer is None for layer in linears):
        return False
    first = linears[0].weight
    return all(
        type(layer) is nn.Linear and getattr(vars(layer).get("forward"), "inference_linear", False)
        and layer.in_features == first.shape[1] and layer.weight.is_contiguous()
        and layer.weight.dtype == first.dtype and (layer.bias is None) == (linears[0].bias is None)
        and (layer.bias is None or layer.bias.dtype == first.dtype)
        and (first.dtype == torch.bfloat16
             or routes_to_onednn(first.new_empty(2, first.shape[1]), layer.weight, layer.bias))
        for layer in linears)


def _pack(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    with torch.no_grad():
        weight = pack_for_sampling(torch.cat([layer.weight for layer in linears]))
        bias = None if linears[0].bias is None else torch.cat([layer.bias for layer in linears])
    return weight, bias


def _packed_by_inference_linears(linear: nn.Linear | None) -> tuple[Tensor, Tensor | None] | None:
    """The packed weight (made now, if not yet) and bias that ``inference_linears``' forward of
    ``linear`` takes for 2+ rows; None where it takes another product (too small, not routed to
    oneDNN, bfloat16 unpacked) or packs none (no memory for the copies)."""
    if not _fusable([linear]):
        return None
    packed_weight = getattr(vars(linear)["forward"], "packed_weight", None)
    return None if packed_weight is None else (packed_weight(), linear.bias)


def _packed_product(x: Tensor, packed: tuple[Tensor, Tensor | None],
                    lora: Callable[[Tensor, Tensor], Tensor] | None) -> Tensor:
    """A projection through its packed weight (and bias), then its LoRA term where one is unfolded."""
    product = packed_linear(x, *packed)
    return product if lora is None else lora(x, product)


def rotate_query_key(query_key: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Llama's rotary embedding of q and k heads side by side: query_key [B, q, heads, D] (a view
    of the fused product), cos [B, q, 1, D], signed_sin [B, q, 1, D] = sin with its first half
    negated -> [B, q, heads, D].

    x cos + rotate_half(x) sin, where rotate_half(x) = (-x2, x1): (-x2) s = x2 (-s) exactly, so
    (x2, x1) times the signed sin is the same product, bitwise; one pass over q and k together
    instead of seven operations on each (and no contiguous copies of them first): 61 -> 29 us per
    layer at 16 rows on the 2-core EPYC. ``SamplingForward`` checks it against the model's own
    ``apply_rotary_pos_emb`` before taking it."""
    half = query_key.shape[-1] // 2
    swapped = torch.cat([query_key[..., half:], query_key[..., :half]], dim=-1)
    return query_key * cos + swapped * signed_sin


def signed_sine(sin: Tensor) -> Tensor:
    """sin [..., D] with its first half negated (``rotate_query_key``)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _rotates_as_llama(apply_rotary: Callable[..., tuple[Tensor, Tensor]], head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the model's ``apply_rotary_pos_emb`` gives ``rotate_query_key``'s numbers bitwise
    (random heads, angles and positions; partial or interleaved rotations do not)."""
    if head_dim % 2:
        return False
    generator = torch.Generator().manual_seed(0)
    query_heads, key_heads = 4, 2
    query, key = (torch.randn(2, 3, heads, head_dim, generator=generator).to(dtype) for heads in (query_heads, key_heads))
    # angles whose halves differ (Llama's repeat theirs), so a rotation of the wrong halves shows
    cos, sin = (torch.randn(2, 3, head_dim, generator=generator).to(dtype) for _ in range(2))
    try:
        expected = apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    except Exception:  # another signature: keep the model's own call
        return False
    together = rotate_query_key(torch.cat([query, key], dim=2), cos.unsqueeze(2), signed_sine(sin).unsqueeze(2))
    return (isinstance(expected, tuple) and len(expected) == 2
            and torch.equal(expected[0], together[:, :, :query_heads].transpose(1, 2))
            and torch.equal(expected[1], together[:, :, query_heads:].transpose(1, 2)))


class SamplingForward:
    """``model(input_ids=, attention_mask=, position_ids=, cache=, use_cache=True, logits_to_keep=)``
    for sampling (eval mode), computed layer by layer from the model's own modules; build it with
    ``sampling_forward``, which checks that the model is one this is exact for, where it is used
    (its packed weights, the fused ones and those of o and down, are taken when it is built: build
    it again after the weights change)."""

    def __init__(self, causal_lm: nn.Module, projections: list[dict[str, _Projection]], fuse: bool,
                 window: int | None = None, folds: list[dict[str, _Fold]] | None = None):
        modeling = sys.modules[type(causal_lm).__module__]
        self.causal_lm = causal_lm
        self.config = causal_lm.config
        # the sliding window of the model's sliding-window layers (None: full attention throughout)
        self.window = window
        self.decoder = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.eager_attention = modeling.eager_attention_forward
        self.apply_rotary = modeling.apply_rotary_pos_emb  # looked up as the model's attention does
        self.layers = []
        # the LoRA folded into this forward's own packed weights (``folds``), not into the model's
        self.folded = folds is not None
        rotates_as_llama: dict[tuple[int, torch.dtype], bool] = {}  # (head_dim, dtype) -> checked once
        for index, (block, parts) in enumerate(zip(self.decoder.layers, projections)):
            attention, mlp = block.self_attn, block.mlp
            layer = _Layer(
                input_norm=block.input_layernorm.forward, post_attention_norm=block.post_attention_layernorm.forward,
                q_norm=attention.q_norm.forward if hasattr(attention, "q_norm") else None,
                k_norm=attention.k_norm.forward if hasattr(attention, "k_norm") else None,
                **{name: part.forward for name, part in parts.items()},
                act=mlp.act_fn, attention=attention,
                q_width=attention.q_proj.out_features, k_width=attention.k_proj.out_features,
                intermediate=mlp.gate_proj.out_features,
                modules=tuple(getattr(attention, f"{name}_proj") for name in "qkvo")
                + tuple(getattr(mlp, f"{name}_proj") for name in ("gate", "up", "down")),
            )
            qkv = [parts[name] for name in "qkv"]
            gate_up = [parts["gate"], parts["up"]]
            if folds is not None:  # every product through the folded packed weights, q/k/v and gate/up fused
                fold = folds[index]
                layer.qkv, layer.qkv_lora = _pack_folded([fold[name] for name in "qkv"]), [None] * 3
                layer.gate_up, layer.gate_up_lora = _pack_folded([fold["gate"], fold["up"]]), [None] * 2
                layer.o_packed, layer.down_packed = _pack_folded([fold["o"]]), _pack_folded([fold["down"]])
            elif fuse and _fusable([part.base for part in qkv]):
                layer.qkv = _pack([part.base for part in qkv])
                layer.qkv_lora = [part.lora for part in qkv]
            if folds is None and fuse and _fusable([part.base for part in gate_up]):
                layer.gate_up = _pack([part.base for part in gate_up])
                layer.gate_up_lora = [part.lora for part in gate_up]
            if fuse and folds is None:
                layer.o_packed, layer.o_lora = _packed_by_inference_linears(parts["o"].base), parts["o"].lora
                layer.down_packed, layer.down_lora = _packed_by_inference_linears(parts["down"].base), parts["down"].lora
            head_dim = attention.head_dim
            if (layer.qkv is not None and all(lora is None for lora in layer.qkv_lora) and layer.q_norm is None
                    and layer.q_width % head_dim == 0 and layer.k_width % head_dim == 0):
                probe = (head_dim, layer.qkv[0].dtype)
                if probe not in rotates_as_llama:
                    rotates_as_llama[probe] = _rotates_as_llama(self.apply_rotary, *probe)
                layer.rotate_together = rotates_as_llama[probe]
            self.layers.append(layer)
        # a rlhf.sampled_products.SampledProducts that keeps the products of the calls it is
        # recording (set by the sampler around each of its forwards); None: nothing kept
        self.recorder: Any = None

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                 cache: Any = None, use_cache: bool = True, logits_to_keep: int | Tensor = 0) -> SamplingOutput:
        """input_ids, position_ids: [B, q]; attention_mask: [B, cached + q]; cache: a transformers
        Cache (None: a new DynamicCache) -> logits [B, logits_to_keep or q, V], cache updated.

        A decode step (one token per row) without gradients runs in inference mode, where PyTorch
        skips autograd's bookkeeping (version counters, view tracking) on every operation of the
        step: the same kernels, so the same numbers. Its logits and the cache entries it makes
        are then inference tensors (read freely outside, not written in place there:
        ``PreallocatedLayer`` keeps its buffers ordinary); a prefill keeps no_grad (also a prompt
        prefix of one column), as the prompt's products it hands to the update must be ordinary
        tensors. The benchmark's rollout on the 2-core EPYC, alternating with no_grad in one
        process: 2.29-2.60 -> 2.32-2.38 s at 32 tokens (6 each), 8.09-8.31 -> 7.73-7.91 s at 128
        (4 each), 16.8 / 17.2 -> 16.3 / 16.4 s at 256."""
        if self.window is not None and self.columns(input_ids, attention_mask, cache) >= self.window:
            # Past the window a sliding layer's mask (and cache) is no longer the full causal one
            # built below; at the window itself it still is, but the model then always builds its
            # mask where the causal one can be None (no padding, one query), and SDPA takes another
            # kernel: from there on the model's own forward, on the cache kept so far the model's way.
            self._release_fused()  # its layers take their own packed weights from here on
            return self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)
        keeping_prefill = self.recorder is not None and self.recorder.keeping_prefill  # a one-column prompt prefix
        if (input_ids.shape[1] == 1 and not keeping_prefill and not torch.is_grad_enabled()
                and not torch.is_inference_mode_enabled()):
            with torch.inference_mode():
                return self._forward(input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep)
        return self._forward(input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache: Any,
                 use_cache: bool, logits_to_keep: int | Tensor) -> SamplingOutput:
        from transformers.cache_utils import DynamicCache
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep

        from rlhf.sampled_products import additive_mask, decode_attention

        hidden = self.decoder.embed_tokens(input_ids)
        if cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = (torch.arange(input_ids.shape[1], device=hidden.device) + cache.get_seq_length()).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        with ordinary_tensors():  # a dynamic rotary embedding re-registers its frequencies as it goes
            cos, sin = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager_attention)
        batch, length = input_ids.shape
        # the fused products only where the separate ones would take the packed weights too; the
        # folded ones always (one row takes another kernel, as the model's own LoRA, unfolded, would:
        # float rounding either way, and no product on an unpacked weight for a row decoded alone)
        fused = ((batch * length >= 2 or self.folded) and not torch.is_grad_enabled()
                 and not torch.is_autocast_enabled(hidden.device.type))
        recording = self.recorder is not None and self.recorder.recording
        # each layer's products (and attention) are handed to the recorder once the layer is done
        # (``SampledProducts.write_together``), not each right after its product
        kept_outputs: list[Tensor] = []
        keep = kept_outputs.append if recording else None
        # the attention's output and log-sum-exp too, for the update's backward (rlhf.sampled_products)
        keep_attention = (keep is not None and length == 1 and attention_function is sdpa_attention_forward
                          and bool(self.recorder.attended))
        # SDPA turns a boolean mask into the one it adds on every call: once per step here (bitwise the same)
        added_mask = additive_mask(mask) if keep_attention else None
        together_cos = together_sin = None  # the rotary angles as rotate_query_key takes them
        for index, layer in enumerate(self.layers):
            normed = layer.input_norm(hidden)
            head_shape = (batch, length, -1, layer.attention.head_dim)
            together = fused and layer.rotate_together
            if fused and layer.qkv is not None:
                qkv = packed_linear(normed, *layer.qkv)
                widths = [layer.q_width, layer.k_width, qkv.shape[-1] - layer.q_width - layer.k_width]
                parts = qkv.split(widths, -1)
                if together:  # views of the product: q and k are rotated from it below
                    query, key, value = parts
                else:
                    query, key, value = (part.contiguous() if lora is None else lora(normed, part)
                                         for part, lora in zip(parts, layer.qkv_lora))
            else:
                query, key, value = layer.q(normed), layer.k(normed), layer.v(normed)
            if keep is not None:
                kept_outputs += (query, key, value)
            value = value.view(head_shape)
            if together:
                if together_cos is None:
                    together_cos, together_sin = cos.unsqueeze(2), signed_sine(sin).unsqueeze(2)
                query_key = qkv[..., :layer.q_width + layer.k_width].view(head_shape)
                rotated = rotate_query_key(query_key, together_cos, together_sin).transpose(1, 2)
                heads = layer.q_width // layer.attention.head_dim
                query, key = rotated[:, :heads], rotated[:, heads:]
            else:
                query, key = query.view(head_shape), key.view(head_shape)
                if layer.q_norm is not None:
                    query, key = layer.q_norm(query), layer.k_norm(key)
                query, key = self.apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
            key, value = cache.update(key, value.transpose(1, 2), index)
            kept_attention = (decode_attention(layer.attention, query, key, value, added_mask, layer.attention.scaling)
                              if keep_attention and self.recorder.keeps_attention(layer.attention) else None)
            if kept_attention is not None:
                attended = kept_attention[0].reshape(batch, length, -1).contiguous()
            else:
                attended, _ = attention_function(layer.attention, query, key, value, mask, dropout=0.0,
                                                 scaling=layer.attention.scaling)
                attended = attended.reshape(batch, length, -1).contiguous()
            attention_output = (_packed_product(attended, layer.o_packed, layer.o_lora)
                                if fused and layer.o_packed is not None else layer.o(attended))
            if keep is not None:
                keep(attention_output)
            hidden = hidden + attention_output
            normed = layer.post_attention_norm(hidden)
            if fused and layer.gate_up is not None:
                gate, up = packed_linear(normed, *layer.gate_up).split(layer.intermediate, -1)
                gate_lora, up_lora = layer.gate_up_lora
                gate = gate.contiguous() if gate_lora is None else gate_lora(normed, gate)
                up = up if up_lora is None else up_lora(normed, up)
            else:
                gate, up = layer.gate(normed), layer.up(normed)
            activated = layer.act(gate) * up
            mlp_output = (_packed_product(activated, layer.down_packed, layer.down_lora)
                          if fused and layer.down_packed is not None else layer.down(activated))
            hidden = hidden + mlp_output
            if keep is not None:
                kept_outputs += (gate, up, mlp_output)
                self.recorder.write_together(layer.modules, kept_outputs)
                kept_outputs.clear()
                if kept_attention is not None:
                    self.recorder.write_attention(layer.attention, attended, kept_attention[1])
        hidden = slice_logits_to_keep(self.decoder.norm(hidden), logits_to_keep)
        logits = self.lm_head(hidden)
        if recording:
            self.recorder.write_logits(logits)
        return SamplingOutput(logits=logits, cache=cache if use_cache else None)

    def runs_every_step(self, columns: int) -> bool:
        """Whether sequences of up to ``columns`` positions stay in this forward at every step (a
        sliding window they reach hands the steps from its edge on to the model's own forward)."""
        return self.window is None or columns < self.window

    def projection_modules(self) -> set[nn.Module]:
        """The projection modules whose outputs a recording call keeps (``recorder``)."""
        return {module for layer in self.layers for module in layer.modules}

    def projection_groups(self) -> list[tuple[nn.Module, ...]]:
        """Each layer's projection modules, in the order a recording call hands their outputs to
        ``SampledProducts.write_together``."""
        return [layer.modules for layer in self.layers]

    def attention_modules(self) -> dict[nn.Module, tuple[nn.Module, ...]]:
        """Each layer's attention module, with its q, k and v projections: a recording decode step
        keeps the attention's output where the recorder holds room for it."""
        return {layer.attention: layer.modules[:3] for layer in self.layers}

    def _release_fused(self) -> None:
        """Drop the fused packed weights: the model's forward packs each layer's own weights, and
        the memory check that allowed the fused copies counted one set, not both. o's and down's
        stay: they are ``inference_linears``' own, which the model's forward takes too; folded
        ones go too (the model's forward runs its LoRA unfolded)."""
        for layer in self.layers:
            layer.qkv = layer.gate_up = None
            layer.rotate_together = False  # it rotates q and k from the fused product
            if self.folded:
                layer.o_packed = layer.down_packed = None

    @staticmethod
    def columns(input_ids: Tensor, attention_mask: Tensor | None, cache: Any) -> int:
        """Cache columns (left padding included) once this call's tokens are in: a sliding-window
        mask lets column j be seen from column i while i - j < window."""
        past = cache.get_seq_length() if cache is not None else 0
        width = attention_mask.shape[-1] if attention_mask is not None else 0
        return max(past + input_ids.shape[1], width)


def sampling_forward(model: nn.Module, fuse: bool = False, reserve_bytes: int = 0, fold: bool = False,
                     columns: int | None = None) -> SamplingForward | None:
    """A ``SamplingForward`` for ``model`` (a causal LM, or a peft model around one), or None
    where it would not give the model's own numbers: another architecture (or a subclass, remote
    code, a patched or compiled module), layers other than full or sliding-window attention, an
    attention implementation other than sdpa/eager, LoRA layers it cannot follow (``projection``), module hooks
    (Accelerate offloading, DeepSpeed/FSDP gathering), training mode, a model split over devices.
    Sliding-window layers (Mistral's ``sliding_window``, Qwen2/Qwen3's ``use_sliding_window``) see
    every earlier column while the sequence is shorter than the window, so there it computes them
    as full attention; a call that reaches the window runs the model's own forward instead.

    ``fuse``: the caller runs it inside ``inference_linears``. The q/k/v and gate/up products
    are then fused where that sends them to oneDNN and there is memory for the packed copies
    (which replace the separate packed weights of q/k/v and gate/up: those are then never made;
    o's and down's packed weights are ``inference_linears``' own, made when this is built).

    ``fold`` (inside ``inference_linears``, the model's LoRA left as it is): every projection's
    LoRA is folded into this forward's own packed weights, W + s * B @ A made one layer at a time
    and packed (``_pack_folded``), so the sampling holds one copy of the weights besides the
    model's where folding them into the model (``rlhf.models.merged_lora_weights``) holds two, the
    folded and the packed. 2+ rows give bitwise the products of the model folded so; a call of
    one row takes the packed weights too (another kernel: float rounding, as the model's own
    forward, its LoRA unfolded, differs by rounding); LoRA outside the projections (on the LM head
    or the embeddings) runs as peft runs it, unfolded, where ``merged_lora_weights`` would fold it.
    None (the caller folds into the model) where a projection cannot be folded (``folding``) or
    its product is not oneDNN's here (``routes_to_onednn``: another CPU, a layer too small), the
    memory does not hold the copies twice over plus ``reserve_bytes``, or sequences of
    ``columns`` positions (None: unknown) could reach a sliding window, past which the model's own
    forward would run with the LoRA unfolded."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = SUPPORTED.get(type(causal_lm).__name__)
    modeling = type(causal_lm).__module__
    if (prefix is None or not modeling.startswith("transformers.models.") or causal_lm.training or _hooked(model)
            or "forward" in vars(model) or "forward" in vars(causal_lm)):
        return None
    config, decoder = causal_lm.config, getattr(causal_lm, "model", None)
    window = _sliding_window(config, prefix)
    if (decoder is None or not _stock(decoder, f"{prefix}Model", modeling)
            or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager")
            or window is False
            or len(decoder.layers) != config.num_hidden_layers
            or len({p.device for p in causal_lm.parameters()}) != 1
            or not all(hasattr(sys.modules[modeling], name) for name in ("eager_attention_forward", "apply_rotary_pos_emb"))):
        return None
    window_reached = window is not None and (columns is None or columns >= window)
    # the module's: the machine's choice as routes_to_onednn reads it (tests set it there)
    if fold and (window_reached or not (onednn_packing_usable() and cpu_linear.use_onednn())):
        return None
    projections = []  # per layer: name -> how the model computes that projection
    folds: list[dict[str, _Fold]] = []
    for block in decoder.layers:
        if not (_stock(block, f"{prefix}DecoderLayer", modeling) and _stock(block.self_attn, f"{prefix}Attention", modeling)
                and _stock(block.mlp, f"{prefix}MLP", modeling)):
            return None
        modules = {name: getattr(block.self_attn, f"{name}_proj") for name in "qkvo"}
        modules |= {name: getattr(block.mlp, f"{name}_proj") for name in ("gate", "up", "down")}
        parts = {name: projection(module) for name, module in modules.items()}
        if any(part is None for part in parts.values()):
            return None
        projections.append(parts)
        if fold:
            folded = {name: folding(module) for name, module in modules.items()}
            # every product where inference_linears sends it, to oneDNN (small layers stay on BLAS)
            if any(part is None or not routes_to_onednn(part.base.weight.new_empty(2, part.base.in_features),
                                                        part.base.weight, part.base.bias)
                   for part in folded.values()) or any(
                    len({folded[name].base.bias is None for name in group}) != 1 for group in ("qkv", ("gate", "up"))):
                return None
            folds.append(folded)
    if fold:
        folded_bytes = sum(part.base.weight.nbytes for layer in folds for part in layer.values())
        if not memory_choice("sampler's LoRA folded into packed weights",
                             lambda memory: 2 * folded_bytes + reserve_bytes < memory):
            return None
        return SamplingForward(causal_lm, projections, fuse=True, window=window, folds=folds)
    fused_bytes = sum(parts[name].base.weight.nbytes for parts in projections for name in FUSED
                      if parts[name].base is not None)
    fuse = fuse and onednn_packing_usable() and 2 * fused_bytes + reserve_bytes < available_memory_bytes()
    return SamplingForward(causal_lm, projections, fuse=fuse, window=window)


def _sliding_window(config: Any, prefix: str) -> int | None | bool:
    """The window of ``config``'s sliding-window layers; None when every layer attends to all
    earlier tokens; False for layers of another kind (chunked, linear attention) or a sliding
    layer without a usable window."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention", "sliding_attention"}:
        return False
    # Mistral's layers all slide when its config has a window (its layer_types are ignored)
    sliding = "sliding_attention" in kinds or (prefix == "Mistral" and getattr(config, "sliding_window", None) is not None)
    if not sliding:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else False
